"""Reasoning models: vLLM's reasoning parser splits off the <think> text, and the bridge never sends
it, nor passes an empty answer off as a reply.

The model is the tiny random-weight Llama made with `make_demo_model.py --think`: its chat template
opens `<think>` (as DeepSeek-R1's does), and the real vLLM CPU server runs it with
`--reasoning-parser deepseek_r1`. Random weights never close `</think>`, so everything the model
writes is reasoning: the answer proper is empty every time.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import (
    DEMO_MODEL_SCRIPT,
    VLLM_PYTHON,
    BridgeProcess,
    Broker,
    Client,
    Engine,
    free_port,
    new_session,
    start_vllm,
    stop_process_group,
)

pytestmark = pytest.mark.integration

PROJECT = "thinker"


@pytest.fixture(scope="module")
def think_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if not Path(VLLM_PYTHON).exists():
        pytest.skip(f"vLLM CPU venv not found at {VLLM_PYTHON} (scripts/provision.sh --tests)")
    model = tmp_path_factory.mktemp("think-model")
    subprocess.run(
        [VLLM_PYTHON, str(DEMO_MODEL_SCRIPT), "--think", str(model)],
        check=True,
        capture_output=True,
    )
    log = tmp_path_factory.mktemp("vllm-think") / "vllm.log"
    engine = start_vllm(model, log, free_port(), extra_args=["--reasoning-parser", "deepseek_r1"])
    yield engine
    stop_process_group(engine.proc)


@pytest.fixture(scope="module")
def think_bridge(
    broker: Broker, think_engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BridgeProcess]:
    bridge = BridgeProcess(
        broker, think_engine, tmp_path_factory.mktemp("bridge-think"), PROJECT, "test-bridge-think"
    )
    bridge.start()
    yield bridge
    bridge.stop()


def test_the_engine_puts_the_text_in_reasoning(think_engine: Engine) -> None:
    """The setup works: vLLM's parser returns the model's words as reasoning, not as content."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    reply = httpx.post(f"{think_engine.url}/v1/chat/completions", json=body, timeout=60).json()
    message = reply["choices"][0]["message"]
    assert message.get("reasoning") or message.get("reasoning_content"), message
    assert not message.get("content")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_reasoning_is_never_sent_as_the_answer(
    think_bridge: BridgeProcess, client_factory: Callable[..., Client], stream: bool
) -> None:
    client = client_factory(think_bridge.broker)
    client.subscribe(f"{PROJECT}/#")
    session = new_session()
    reply_topic = f"{PROJECT}/assistant_response/{session}"
    client.publish(
        f"{PROJECT}/user_input",
        {
            "sessionId": session,
            "message": "hello",
            "requestId": f"think-{stream}",
            "maxTokens": 8,
            "temperature": 0,
            "format": "json",
            "stream": stream,
        },
    )
    envelope = client.get(60, topic=reply_topic).json()
    assert envelope["status"] == "error"
    assert envelope["error"]["code"] == "no_answer"
    assert "maxTokens" in envelope["error"]["message"]
    assert envelope["text"] is None
    time.sleep(1.0)  # anything published after the reply would arrive by now
    parts = [r for r in client.all if r.topic == reply_topic + "/stream"]
    assert all(not json.loads(r.payload).get("delta") for r in parts), parts
