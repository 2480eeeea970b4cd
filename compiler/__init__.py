"""config.yaml (or the seed's config.py) -> Triton model repository.

The pipeline, one module a stage: load -> schema -> check -> plan -> render -> write.
Only ``write`` touches the disk.
"""
