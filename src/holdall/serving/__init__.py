"""Serving: one base model, many LoRA adapters, one OpenAI-compatible HTTP server.

    from holdall.serving import Engine, EngineConfig, GenerationRequest, SamplingParams
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=8)).start()
    engine.load_adapter("client-a", "out/client-a")
    print(engine.generate(GenerationRequest(prompt_ids, SamplingParams(temperature=0), "client-a")).text)

``serve(model, adapters={...}, config=ServeConfig(...))`` runs the HTTP server (``holdall serve``); FastAPI and
uvicorn are imported only then (``pip install 'holdall[serve]'``).
"""

from holdall.serving.config import EngineConfig, ServeConfig
from holdall.serving.engine import Engine, GenerationRequest, GenerationResult, StreamEvent
from holdall.serving.sampling import SamplingParams
from holdall.serving.server import serve

__all__ = [
    "Engine",
    "EngineConfig",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "ServeConfig",
    "StreamEvent",
    "serve",
]
