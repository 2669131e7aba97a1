
# XLA settings every test process uses (in-process through tests/conftest.py, and every run.py, chat.py and worker
# subprocess): the tests' programs are small, so compiling is most of their time. Optimisation level 0 compiles
# about a fifth faster; the legacy fusion emitters instead of XLA:CPU's MLIR ones halve the backend compile time
# (the tiny reference pipeline: 37 s -> 16 s of compilation). Runs compared bit for bit use the same flags.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
