"""Native CPU kernels called through `jax.ffi`, compiled from C++ on first use (`build.py`)."""
