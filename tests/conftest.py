import os

# Tests run on the CPU; multi-device tests start their own subprocess with the XLA flag set.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
