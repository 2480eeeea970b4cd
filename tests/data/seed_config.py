# The seed's first form (shared/seeds/): one flat dict per service.
EMBEDDING_SERVICE_CONFIG = {
    "embedding_model_name": "sentence-transformers/all-MiniLM-L6-v2",
    "device": "cpu",
    "batch_size": 64,
    "batch_timeout": 0.01,
    "max_queue_size": 500,
    "worker_count": 4,
    "queue_timeout": 0.05,
    "inference_timeout": 0.3,
    "total_timeout": 0.5,
    "rate_limit": 100,
    "enable_cache": True,
}

RERANKER_SERVICE_CONFIG = {
    "reranker_model_name": "cross-encoder/ms-marco-MiniLM-L-6-v2",
    "batch_size": 16,
    "batch_timeout": 0.02,
    "max_queue_size": 200,
    "worker_count": 2,
    "queue_timeout": 0.1,
    "inference_timeout": 0.5,
    "total_timeout": 0.8,
    "rate_limit": 50,
    "enable_cache": False,
}

LLM_SERVICE_CONFIG = {
    "llm_model_name": "Qwen/Qwen2.5-0.5B-Instruct",
    "batch_size": 4,
    "batch_timeout": 0.05,
    "max_queue_size": 50,
    "worker_count": 1,
    "queue_timeout": 0.2,
    "inference_timeout": 2.0,
    "total_timeout": 3.0,
    "rate_limit": 10,
    "enable_cache": False,
}
