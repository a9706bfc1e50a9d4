"""holdall serve: one base, several LoRA adapters, mixed batches, and OpenAI's HTTP API.

Witnesses:
* a *separate* model instance (the base reloaded from disk, each adapter loaded from its saved PEFT directory,
  chosen with ``set_adapter``) decoding greedily by full recomputation — no KV cache, no padding, one row —
  itself checked against transformers' ``generate``;
* the real ``openai`` client against a real uvicorn server on 127.0.0.1.

Why greedy outputs can be compared for equality: a row of a mixed, left-padded batch computes the same math as
the row alone, but float32 sums over different batch shapes (BLAS blocking, a longer masked key axis) may round
differently (measured: logits of magnitude ~18 differ by ~4e-6). That could flip an argmax only between two
near-tied logits, so the tiny model's output head is scaled up (x50) to make every step's top-2 logit gap large,
and ``reference`` asserts that gap (> 1e-3, hundreds of times the rounding) for every token it predicts:
equality then cannot hinge on rounding.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from holdall.errors import UnsupportedModelError
from holdall.models.loading import load_model
from holdall.serving import Engine, EngineConfig, GenerationRequest, SamplingParams, ServeConfig
from holdall.serving.app import create_app
from holdall.serving.errors import AdapterInUseError, QueueFullError, RequestTooLargeError, UnknownModelError
from holdall.serving.sampling import TextStream, sample_rows
from holdall.serving.server import build_engine, parse_adapter_specs, start_in_thread
from holdall.tuners.lora import (
    LoraConfig,
    add_lora,
    disable_adapters,
    load_adapter,
    lora_layers,
    save_adapter,
    set_adapter,
)

BASE = "tiny-base"
KEY = "test-key"
ADAPTERS = ("a", "b", "c")
MARGIN = 1e-3
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
PROMPTS = ("the quick brown fox", "three customers each want their own model", "adapters tailor behaviour and")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: a second thread only adds hand-offs, which dominate on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- artifacts: a base and adapters on disk --------------------------------------------------------------
def _randomize_b(model, name: str, seed: int, scale: float = 0.3) -> None:
    """B = 0 makes a fresh adapter a no-op; random B makes each adapter change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_B:
                weight = layer.lora_B[name].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


def _tiny_base(tokenizer, hidden: int = 64):
    model = make_tiny_llama(hidden=hidden, vocab=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # peaked logits: large top-2 gaps (see the module docstring)
    return model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("serve")
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = _tiny_base(tokenizer)
    base_dir = root / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    adapters = {}
    for i, name in enumerate((*ADAPTERS, "d")):
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), name)
        _randomize_b(model, name, seed=100 + i)
        adapters[name] = save_adapter(model, root / f"adapter-{name}", name)
    biased = make_tiny_llama(vocab=len(tokenizer))
    add_lora(biased, LoraConfig(r=2, alpha=4, dropout=0.0, bias="all"), "biased")
    foreign = make_tiny_llama(hidden=32, vocab=len(tokenizer))
    add_lora(foreign, LoraConfig(r=2, alpha=4, dropout=0.0), "foreign")
    return SimpleNamespace(
        tokenizer=tokenizer, base_dir=base_dir, adapters=adapters,
        biased_dir=save_adapter(biased, root / "adapter-biased", "biased"),
        foreign_dir=save_adapter(foreign, root / "adapter-foreign", "foreign"),
    )


@pytest.fixture(scope="module")
def ref_model(artifacts):
    """The witness: its own copy of the base with every adapter loaded from disk."""
    model, _ = load_model(artifacts.base_dir)
    for name, path in artifacts.adapters.items():
        load_adapter(model, path, name)
    return model


def reference(ref_model, prompt_ids, adapter: str | None, max_tokens: int, eos_id: int = 2) -> list[int]:
    """Greedy ids by full recomputation (EOS included when generated), asserting a safe top-2 gap at each step."""
    ids = list(prompt_ids)
    out = []
    context = disable_adapters(ref_model) if adapter is None else _active(ref_model, adapter)
    with context, torch.no_grad():
        for _ in range(max_tokens):
            logits = ref_model(torch.tensor([ids])).logits[0, -1]
            top = logits.topk(2).values
            assert top[0] - top[1] > MARGIN, "near-tied logits: pick another seed/prompt (module docstring)"
            token = int(logits.argmax())
            out.append(token)
            if token == eos_id:
                break
            ids.append(token)
    return out


class _active:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        set_adapter(self.model, self.name)

    def __exit__(self, *exc):
        set_adapter(self.model, [])


def words(tokenizer, ids) -> list[str]:
    return tokenizer.decode(ids, skip_special_tokens=True).split()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


# --- the server ----------------------------------------------------------------------------------------------
ENGINE = EngineConfig(max_batch_size=4, max_prompt_tokens=48, max_new_tokens=24, max_queued_requests=64)


@pytest.fixture(scope="module")
def server(artifacts):
    adapters = {name: artifacts.adapters[name] for name in ADAPTERS}
    engine, name = build_engine(artifacts.base_dir, adapters, ENGINE, served_model_name=BASE)
    config = ServeConfig(api_key=KEY, max_body_bytes=20_000, max_choices=8, engine=ENGINE)
    running = start_in_thread(create_app(engine, config, name))
    yield SimpleNamespace(url=running.url, engine=engine)
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


# --- the reference itself --------------------------------------------------------------------------------
def test_reference_equals_transformers_generate(artifacts, ref_model):
    prompt = _ids(artifacts.tokenizer, PROMPTS[1])
    with _active(ref_model, "b"), torch.no_grad():
        generated = ref_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                                       pad_token_id=0)[0, len(prompt):].tolist()
    assert generated == reference(ref_model, prompt, "b", 8)


# --- HTTP: models, completions, chat ---------------------------------------------------------------------
def test_models_lists_the_base_and_its_adapters(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, *ADAPTERS]
    assert [getattr(m, "parent", None) for m in models] == [None, BASE, BASE, BASE]
    assert client.models.retrieve("b").id == "b"


def test_completions_use_the_adapter_named_by_model(client, artifacts, ref_model):
    tok = artifacts.tokenizer
    for prompt in PROMPTS[:2]:
        served = {}
        for model in (BASE, *ADAPTERS):
            response = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
            expected = reference(ref_model, _ids(tok, prompt), None if model == BASE else model, 10)
            choice = response.choices[0]
            assert choice.text.split() == words(tok, expected), model
            assert choice.finish_reason == ("stop" if expected[-1] == 2 else "length")
            assert response.model == model and response.object == "text_completion"
            assert response.usage.prompt_tokens == len(_ids(tok, prompt))
            assert response.usage.completion_tokens == len(expected)
            assert response.usage.total_tokens == response.usage.prompt_tokens + len(expected)
            served[model] = choice.text
        assert len(set(served.values())) == len(served), f"adapters should change the output: {served}"


def test_chat_uses_the_chat_template(client, artifacts, ref_model):
    tok = artifacts.tokenizer
    messages = [{"role": "system", "content": "a lazy dog"}, {"role": "user", "content": "the quick brown fox"}]
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    assert prompt[0] == tok.bos_token_id
    for model in (BASE, "c"):
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        expected = reference(ref_model, prompt, None if model == BASE else model, 8)
        message = response.choices[0].message
        assert message.role == "assistant" and message.content.split() == words(tok, expected)
        assert response.object == "chat.completion" and response.usage.prompt_tokens == len(prompt)


def test_several_prompts_and_n(client):
    response = client.completions.create(model="a", prompt=list(PROMPTS[:2]), n=2, max_tokens=6, temperature=0)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    single = client.completions.create(model="a", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert single.choices[0].text == texts[2]


# --- streaming -------------------------------------------------------------------------------------------
def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1, "text should arrive in pieces"


def test_streamed_chat_in_openai_chunk_format(client, server):
    messages = [{"role": "user", "content": "three customers each want"}]
    whole = client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    raw = _post(server, "/v1/chat/completions", {"model": "a", "messages": messages, "max_tokens": 3,
                                                 "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_strings_end_the_output(client, artifacts, ref_model):
    tok = artifacts.tokenizer
    expected = words(tok, reference(ref_model, _ids(tok, PROMPTS[0]), "a", 10))
    stop_word = expected[2]
    cut = expected[: expected.index(stop_word)]
    for stream in (False, True):
        response = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                             stop=[" " + stop_word], stream=stream)
        if stream:
            chunks = [c for c in response if c.choices]
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = response.choices[0].text, response.choices[0].finish_reason
        assert text.split() == cut and reason == "stop"


def test_seeded_sampling_repeats(client):
    kwargs = dict(model="c", prompt=PROMPTS[1], max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    other = [client.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in range(8, 12)]
    assert any(text != first for text in other), "different seeds should sample differently"


# --- concurrency: mixed batches ----------------------------------------------------------------------------
def test_concurrent_requests_across_adapters_equal_their_solo_answers(client, server, artifacts, ref_model):
    tok = artifacts.tokenizer
    jobs = [(model, prompt) for prompt in PROMPTS for model in (BASE, *ADAPTERS)]
    mixed_before = server.engine.stats.mixed_steps
    barrier = threading.Barrier(len(jobs))

    def run(job):
        model, prompt = job
        barrier.wait()  # all requests in flight together
        return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(run, jobs))
    for (model, prompt), text in zip(jobs, texts):
        expected = reference(ref_model, _ids(tok, prompt), None if model == BASE else model, 12)
        assert text.split() == words(tok, expected), (model, prompt)
    assert server.engine.stats.mixed_steps > mixed_before, "requests for different adapters should share passes"
    assert server.engine.stats.max_batch_seen == ENGINE.max_batch_size


# --- adapters at runtime --------------------------------------------------------------------------------------
def test_load_and_unload_an_adapter_while_serving(client, server, artifacts, ref_model):
    response = _post(server, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": str(artifacts.adapters["d"])})
    assert response.status_code == 200, response.text
    assert "d" in [m.id for m in client.models.list().data]
    text = client.completions.create(model="d", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    tok = artifacts.tokenizer
    assert text.split() == words(tok, reference(ref_model, _ids(tok, PROMPTS[0]), "d", 8))
    again = _post(server, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": str(artifacts.adapters["d"])})
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]

    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "d"}).status_code == 200
    assert "d" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="d", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    gone = _post(server, "/v1/unload_lora_adapter", {"lora_name": "d"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_adapter_for_another_base_is_refused(server, artifacts):
    response = _post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(artifacts.foreign_dir)})
    assert response.status_code == 400
    assert "this adapter was trained for" in response.json()["error"]["message"]
    missing = _post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent/adapter"})
    assert missing.status_code == 404 and "no adapter at" in missing.json()["error"]["message"]
    biased = _post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(artifacts.biased_dir)})
    assert biased.status_code == 400 and "trains biases" in biased.json()["error"]["message"]
    assert "x" not in server.engine.adapters


def test_busy_adapter_cannot_be_unloaded_and_a_closed_stream_stops_generating(server, ref_model, artifacts):
    """A slowed-down model keeps one streamed request in flight long enough to look at it."""
    # The request must still be running when the unload arrives: adapter "a" on this prompt generates all 24
    # tokens (adapter "c" stops at its 4th, which on a loaded machine can come before the unload does).
    prompt = PROMPTS[0]
    assert len(reference(ref_model, _ids(artifacts.tokenizer, prompt), "a", 24)) == 24
    # 0.2 s per forward x 24 tokens. Hooked on the output head, which every prefill and decode step calls
    # (the engine may call the model's forward directly, which skips hooks on the model itself).
    head = server.engine.model.get_output_embeddings()
    slow = head.register_forward_pre_hook(lambda *args: time.sleep(0.2))
    cancelled_before = server.engine.stats.requests_cancelled
    body = {"model": "a", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
            busy = _post(server, "/v1/unload_lora_adapter", {"lora_name": "a"})
            assert busy.status_code == 409 and "queued or running" in busy.json()["error"]["message"]
        # leaving the block closed the connection: the engine should drop the row long before 24 tokens
        deadline = time.monotonic() + 20
        while server.engine.stats.requests_cancelled == cancelled_before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.engine.stats.requests_cancelled == cancelled_before + 1
        assert server.engine.in_use("a") == 0
    finally:
        slow.remove()
    assert "a" in server.engine.adapters


# --- auth and errors -----------------------------------------------------------------------------------------------
def test_api_key_is_required(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.get(server.url + "/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "prompt": "the"}, 404, "does not exist on this server"),
        ({"model": BASE}, 400, "prompt"),
        ({"model": BASE, "prompt": "the", "temperature": "hot"}, 400, "temperature"),
        ({"model": BASE, "prompt": "the", "temperature": 3}, 400, "temperature"),
        ({"model": BASE, "prompt": "the " * 60}, 400, "max_prompt_tokens"),
        ({"model": BASE, "prompt": "the", "max_tokens": 100}, 400, "max_new_tokens"),
        ({"model": BASE, "prompt": "the", "logprobs": 2}, 400, "logprobs"),
        ({"model": BASE, "prompt": "the", "n": 9}, 400, "at most 8"),
        ({"model": BASE, "prompt": [999]}, 400, "outside the vocabulary"),
        ({"model": BASE, "prompt": "the " * 6000}, 413, "--max-body-bytes"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, needle):
    response = _post(server, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and {"type", "param", "code"} <= set(error)


def test_openai_client_sees_the_status_classes(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "the"}])
    with pytest.raises(openai.BadRequestError, match="max_prompt_tokens"):
        client.completions.create(model=BASE, prompt="the " * 60)
    unknown_route = httpx.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown_route.status_code == 404 and "error" in unknown_route.json()


def test_queue_full_and_stopped_engine_map_to_429_and_503(artifacts):
    from fastapi.testclient import TestClient

    model, tokenizer = load_model(artifacts.base_dir)
    engine = Engine(model, tokenizer, EngineConfig(max_queued_requests=1))  # never started: the queue stays full
    app = create_app(engine, ServeConfig(engine=engine.config), BASE)
    http = TestClient(app)  # outside `with`: no lifespan, so the engine is not started
    engine.submit(GenerationRequest(_ids(tokenizer, "the"), SamplingParams(max_tokens=2)), lambda event: None)
    full = http.post("/v1/completions", json={"model": BASE, "prompt": "the", "max_tokens": 2})
    assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
    engine.stop()
    stopped = http.post("/v1/completions", json={"model": BASE, "prompt": "the", "max_tokens": 2})
    assert stopped.status_code == 503


# --- the engine without HTTP ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_model(artifacts):
    model, tokenizer = load_model(artifacts.base_dir)
    for name in ADAPTERS:
        load_adapter(model, artifacts.adapters[name], name)
    return model, tokenizer


def _requests(tokenizer, max_tokens=(9, 4, 12, 6)):
    jobs = []
    for i, (prompt, adapter) in enumerate((p, a) for p in PROMPTS for a in (None, *ADAPTERS)):
        params = SamplingParams(max_tokens=max_tokens[i % len(max_tokens)], temperature=0)
        jobs.append(GenerationRequest(_ids(tokenizer, prompt), params, adapter))
    return jobs


def _run_all(engine: Engine, requests) -> list:
    """Submit everything before the scheduler starts, so the first batch is as full and mixed as allowed."""
    sinks = []
    for request in requests:
        sink: queue.Queue = queue.Queue()
        engine.submit(request, sink.put)
        sinks.append(sink)
    with engine:
        finals = []
        for sink in sinks:
            while not (event := sink.get(timeout=60)).final:
                pass
            finals.append(event)
    return finals


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(max_batch_size=16),  # everything in one mixed batch
        EngineConfig(max_batch_size=3),  # continuous batching: rows join as others finish
        EngineConfig(max_batch_size=4, mixed_batches=False),  # one adapter at a time
        EngineConfig(max_batch_size=4, continuous_batching=False),  # waves
    ],
    ids=["one-batch", "continuous", "unmixed", "waves"],
)
def test_engine_batches_give_the_solo_answers(engine_model, ref_model, config):
    model, tokenizer = engine_model
    requests = _requests(tokenizer)
    engine = Engine(model, tokenizer, config)
    finals = _run_all(engine, requests)
    for request, event in zip(requests, finals):
        expected = reference(ref_model, request.prompt_ids, request.adapter, request.params.max_tokens)
        generated = list(event.token_ids) + ([2] if event.completion_tokens > len(event.token_ids) else [])
        assert generated == expected, request
    stats = engine.stats
    assert stats.requests_finished == len(requests) and stats.requests_failed == 0
    if config.mixed_batches:
        assert stats.mixed_steps > 0
    else:
        assert stats.mixed_steps == 0
    if config.max_batch_size == 3:
        assert stats.prefill_passes > len(requests) / 3, "rows should be admitted between decode steps"


def test_engine_serves_adapters_on_a_quantized_base(artifacts):
    """QLoRA's setting: an NF4 base (QuantLinear) under the LoRA wrappers; mixed batches still equal solo runs."""
    from holdall.algorithms import QuantConfig, quantize

    model, tokenizer = load_model(artifacts.base_dir)
    quantize(model, QuantConfig.for_method("nf4"), progress=False)
    for name in ADAPTERS[:2]:
        load_adapter(model, artifacts.adapters[name], name)
    requests = [r for r in _requests(tokenizer) if r.adapter in (None, *ADAPTERS[:2])]
    expected = [reference(model, r.prompt_ids, r.adapter, r.params.max_tokens) for r in requests]
    finals = _run_all(Engine(model, tokenizer, EngineConfig(max_batch_size=16)), requests)
    for request, event, want in zip(requests, finals, expected):
        assert list(event.token_ids) + [2] * (event.completion_tokens - len(event.token_ids)) == want, request


def test_unload_is_refused_while_the_adapter_is_in_use(artifacts):
    model, tokenizer = load_model(artifacts.base_dir)
    engine = Engine(model, tokenizer, EngineConfig())
    engine.load_adapter("d", artifacts.adapters["d"])
    events: queue.Queue = queue.Queue()
    engine.submit(GenerationRequest(_ids(tokenizer, "the"), SamplingParams(max_tokens=3, temperature=0), "d"),
                  events.put)
    with pytest.raises(AdapterInUseError, match="1 request"):
        engine.unload_adapter("d")
    with engine:
        while not events.get(timeout=30).final:
            pass
        engine.unload_adapter("d")
        assert engine.adapters == []
        with pytest.raises(UnknownModelError):
            engine.submit(GenerationRequest([5], SamplingParams(), "d"), events.put)


def test_engine_limits_and_cancellation(artifacts):
    model, tokenizer = load_model(artifacts.base_dir)
    engine = Engine(model, tokenizer, EngineConfig(max_queued_requests=2, max_prompt_tokens=4, max_new_tokens=5))
    with pytest.raises(RequestTooLargeError, match="at most 4"):
        engine.submit(GenerationRequest([5] * 5, SamplingParams(max_tokens=2)), print)
    with pytest.raises(RequestTooLargeError, match="at most 5"):
        engine.submit(GenerationRequest([5], SamplingParams(max_tokens=6)), print)
    dropped, kept = queue.Queue(), queue.Queue()
    cancelled = engine.submit(GenerationRequest([5, 6], SamplingParams(max_tokens=5, temperature=0)), dropped.put)
    engine.submit(GenerationRequest([5, 7], SamplingParams(max_tokens=5, temperature=0)), kept.put)
    with pytest.raises(QueueFullError):
        engine.submit(GenerationRequest([5], SamplingParams(max_tokens=1)), kept.put)
    cancelled.cancel()
    with engine:
        while not kept.get(timeout=30).final:
            pass
    assert dropped.empty(), "a cancelled request must not be generated"
    assert engine.stats.requests_cancelled == 1 and engine.stats.requests_finished == 1


def test_adapter_checks_at_engine_load(artifacts):
    model, tokenizer = load_model(artifacts.base_dir)
    engine = Engine(model, tokenizer)
    with pytest.raises(UnsupportedModelError, match="this adapter was trained for"):
        engine.load_adapter("foreign", artifacts.foreign_dir)
    with pytest.raises(UnsupportedModelError, match="trains biases"):
        engine.load_adapter("biased", artifacts.biased_dir)
    assert engine.adapters == []


# --- pieces ----------------------------------------------------------------------------------------------------
class _CharTokenizer:
    """One character per id: makes partial stop strings easy to set up."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_string():
    stream = TextStream(_CharTokenizer(), [ord(">")], stop=["END"])
    sent = [stream.push(ord(c)) for c in "abEN"]
    assert sent == ["a", "b", "", ""]  # "EN" may still become "END"
    assert stream.push(ord("x")) == "ENx"
    assert stream.push(ord("E")) == "" and stream.push(ord("N")) == "" and stream.push(ord("D")) == ""
    assert stream.stopped and stream.text == "abENx"


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    picks = {sample_rows(logits, [SamplingParams(temperature=1.0, top_p=0.5)], [generator])[0] for _ in range(50)}
    assert picks == {0}
    wide = {sample_rows(logits, [SamplingParams(temperature=1.0, top_p=1.0)], [generator])[0] for _ in range(200)}
    assert {0, 1} <= wide


def test_prefill_groups_bound_the_padding():
    from holdall.serving.engine import _prefill_groups

    seqs = [SimpleNamespace(request=SimpleNamespace(prompt_ids=[0] * n)) for n in (40, 400, 42, 45, 380)]
    groups = _prefill_groups(seqs)
    assert [[len(s.request.prompt_ids) for s in g] for g in groups] == [[40, 42, 45], [380, 400]]


# --- CLI -----------------------------------------------------------------------------------------------------------
def test_cli_serve_refuses_bad_options_before_loading(capsys):
    from holdall.cli.main import main

    assert main(["serve", "smollm2", "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", "smollm2", "--max-batch", "0"]) == 2
    assert "max_batch_size must be a positive integer" in capsys.readouterr().err
    assert parse_adapter_specs(["a=x/y", "b=z"]) == {"a": "x/y", "b": "z"}


def test_cli_serve_end_to_end(artifacts):
    """`holdall serve` in its own process: adapters from disk, a completion through the openai client, Ctrl-C."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port (the tiny window before the server binds it is harmless here)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "holdall", "serve", str(artifacts.base_dir), "--served-model-name", BASE,
            "--adapter", f"a={artifacts.adapters['a']}", "--port", str(port), "--api-key", KEY,
            "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "holdall serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [BASE, "a"]
        response = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=5, temperature=0)
        assert response.usage.completion_tokens >= 1
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode in (0, 130)

