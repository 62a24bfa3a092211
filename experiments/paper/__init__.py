"""Library code of the paper's experiments (Kitada & Iyatomi 2021): data loading with the paper's recipes,
models and training methods, metrics, heat maps. The scripts in experiments/ import it as ``paper``."""
