"""The built-in Backend entries (trtforge.backend.Backend), one module each, registered in BACKENDS:

* ``cpu_ort.py``            ``cpu``: ONNX optimized offline for ONNX Runtime's CPU provider;
* ``tensorrt.py``           ``sm_XX``/``hopper``/``auto``: a TensorRT engine;
* ``trtllm_checkpoint.py``  ``trtllm``: a TensorRT-LLM checkpoint (Model Optimizer's unified format).

trtforge.registry imports them on first use of BACKENDS; nothing imports them by name.
"""
