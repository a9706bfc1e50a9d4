"""``serve()``: the verb behind ``holdall serve`` — load a base and its adapters, run the HTTP server.

FastAPI and uvicorn are imported only here, inside functions (``pip install 'holdall[serve]'``), so
``import holdall.serving`` stays as light as the engine.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from holdall.errors import ConfigError, require
from holdall.serving.config import EngineConfig, ServeConfig
from holdall.serving.engine import Engine


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["client-a=out/a", ...]`` -> ``{"client-a": "out/a"}`` (the CLI's ``--adapter NAME=PATH``)."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = (part.strip() for part in spec.partition("="))
        if not sep or not name or not path:
            raise ConfigError(f"--adapter takes NAME=PATH (e.g. client-a=out/client-a), got {spec!r}")
        if name in adapters:
            raise ConfigError(f"--adapter {name!r} is given twice; each adapter needs its own name")
        adapters[name] = path
    return adapters


def build_engine(model: str | os.PathLike, adapters: Mapping[str, str | os.PathLike] | None = None,
                 engine_config: EngineConfig | None = None, *, served_model_name: str | None = None,
                 dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                 ) -> tuple[Engine, str]:
    """Load ``model`` (any form ``load_model`` takes) and ``adapters`` (name -> PEFT dir) into an Engine.

    Returns the engine (not started) and the base's name in the API (``served_model_name``, else the spec as
    given). An adapter made for another base raises holdall's ``UnsupportedModelError`` naming that base.
    """
    from holdall.models.loading import load_model

    name = served_model_name or os.fspath(model)
    adapters = dict(adapters or {})
    if name in adapters:
        raise ConfigError(f"adapter name {name!r} is also the base model's name; give the adapter another name")
    base, tokenizer = load_model(model, dtype=dtype, device=device)
    if tokenizer is None:
        raise ConfigError(f"{model} ships no tokenizer, and serving text needs one; use a model directory with "
                          "tokenizer files (tokenizer.json / tokenizer_config.json)")
    engine = Engine(base, tokenizer, engine_config)
    for adapter_name, path in adapters.items():
        engine.load_adapter(adapter_name, path)
    return engine, name


def serve(model: str | os.PathLike, adapters: Mapping[str, str | os.PathLike] | None = None,
          config: ServeConfig | None = None, *, dtype: torch.dtype | None = torch.float32,
          device: str | torch.device = "cpu") -> None:
    """Serve ``model`` and ``adapters`` over an OpenAI-compatible HTTP API until interrupted (Ctrl-C)."""
    config = config or ServeConfig()
    uvicorn = require("uvicorn", "serve", "holdall serve")
    require("fastapi", "serve", "holdall serve")
    from holdall.serving.app import create_app

    engine, name = build_engine(model, adapters, config.engine, served_model_name=config.served_model_name,
                                dtype=dtype, device=device)
    app = create_app(engine, config, name, base_root=os.fspath(model))
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)


@dataclass
class RunningServer:
    """A server running in a background thread (tests, benchmarks): ``url`` ends without a slash."""

    url: str
    server: object
    thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    timeout: float = 30.0) -> RunningServer:
    """Run ``app`` under uvicorn in a daemon thread; port 0 takes a free port. Returns once it accepts requests."""
    uvicorn = require("uvicorn", "serve", "holdall serve")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, name="holdall-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(f"http://{host}:{bound_port}", server, thread)


__all__ = ["RunningServer", "build_engine", "parse_adapter_specs", "serve", "start_in_thread"]
