"""config.yaml (or the seed's config.py) -> Triton model repository.

The pipeline, one module a stage: load -> schema -> check -> plan -> render -> write.
Only ``write`` touches the disk. Beside the pipeline, ``hub`` finds a Hugging Face id in the local HF cache and
``pull`` (`sluice pull`) downloads into it: the compiler's only network access.
"""
