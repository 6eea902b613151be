"""Real sentences used to build validation inputs when the user gives none.

Plain English prose written for this project (no third-party text), varied in length so that
padded batches have real padding.
"""

from __future__ import annotations

SENTENCES = (
    "The build step turns a trained model into an engine that serves requests quickly.",
    "A release reviewer reads the parity report before the new model goes to production.",
    "Quantization maps floating point weights to eight bit integers with a scale per channel.",
    "Short text.",
    "When the calibration data looks like production traffic, the activation ranges are tighter and the quantized model keeps its accuracy.",
    "The river was cold, and the children ran along its bank until the sun went down behind the hills.",
    "Engineers measure latency at the ninety-ninth percentile because users notice the slow requests.",
    "Please keep the lights on.",
    "Every stage writes its result to a temporary folder and renames it only when the work is complete.",
    "The cat slept on the warm windowsill while rain fell on the garden outside.",
    "Accuracy, latency and memory are traded against each other in every deployment decision.",
    "She opened the old book and found a letter that had been hidden between its pages for years.",
)
