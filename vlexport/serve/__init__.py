"""Serving: Triton Inference Server model repositories written from artifact directories (``vlexport
triton``).

``triton_config`` builds config.pbtxt as tritonclient's ModelConfig protobuf, ``triton_repo`` plans and writes
the repository; the ``py_*`` modules are the python-backend models the repository's ``model.py`` files import
(they run inside tritonserver's python stub, which provides ``triton_python_backend_utils``).
"""
