"""
serve.py against openpi's own client: the metadata, actions equal to Policy.predict's, bad requests, several clients,
/healthz, the API key and SIGTERM, on a tiny checkpoint trained for one step. Loopback only, CPU only.

    pip install -r requirements.txt -r requirements-serve.txt
    pip install --no-deps openpi-client==0.1.2 dm-tree==0.1.10
    python -m pytest -q test_serve.py
"""

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import torch
import websockets
from openpi_client import action_chunk_broker, msgpack_numpy, websocket_client_policy
from websockets.sync.client import connect

import data
import infer
import serve
from demo import make_demo, make_tiny

torch.set_num_threads(1)  # as the server under OMP_NUM_THREADS=1: the same kernels, the same sums
HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {k: v for k, v in os.environ.items() if k != "NANOOFT_API_KEY"} | {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
KEY = "k3y-for-tests"
# openpi-client 0.1.2 opens its connection the way websockets 17 warns about (still supported): not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
SIZES = {"head_camera_image": (240, 320), "left_wrist_image": (256, 256)}  # one squashed to the training 256x256


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Two cameras and proprioception, one training step: a real checkpoint directory, as a user's."""
    root = tmp_path_factory.mktemp("serve")
    make_demo(str(root / "demo"), episodes=2, seed=0)
    make_tiny(str(root / "tiny"))
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--vla_path",
            root / "tiny",
            "--data_dir",
            root / "demo",
            "--out_dir",
            root / "run",
            "--val_episodes",
            "1",
            "--batch_size",
            "2",
            "--num_workers",
            "0",
            "--lora_rank",
            "4",
            "--max_steps",
            "1",
            "--save_interval",
            "1",
            "--eval_interval",
            "1",
            "--eval_batches",
            "1",
            "--proprio",
        ],
        cwd=HERE,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return str(root / "run" / "step_000001")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "serve.py", "--checkpoint", ckpt, "--port", "0", "--device", "cpu", "--api_key", KEY],
            cwd=HERE,
            env=ENV,
            stdout=out,
            stderr=err,
        )
    deadline = time.time() + 120
    while not (m := re.search(r"on ws://127\.0\.0\.1:(\d+) ", (logs / "out").read_text())):
        assert proc.poll() is None, (logs / "err").read_text()[-3000:]
        assert time.time() < deadline, "serve.py did not start within 120 s"
        time.sleep(0.2)
    proc.port, proc.out, proc.err = int(m[1]), logs / "out", logs / "err"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def policy(ckpt):
    return infer.Policy.from_checkpoint(ckpt, device="cpu")


def observation(seed):
    rng = np.random.default_rng(seed)
    return {
        "images": {c: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for c, hw in SIZES.items()},
        "prompt": ["place the shoe on the mat", "put the shoe down"][seed % 2],
        "state": rng.uniform(-0.5, 1.0, 14),
    }


def expected(policy, obs):
    return policy.predict(obs["images"], obs["prompt"], obs["state"]).astype(np.float32)


def client(server, api_key=KEY):
    return websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.port, api_key=api_key)


def assert_answers(answer, policy, obs):
    assert answer["actions"].dtype == np.float32 and answer["actions"].shape == (8, 14)
    np.testing.assert_allclose(answer["actions"], expected(policy, obs), rtol=0, atol=1e-6)
    assert answer["server_timing"]["infer_ms"] > 0


def test_metadata_and_actions_equal_policy_predict(server, policy, ckpt):
    c = client(server)
    assert c.get_server_metadata() == {
        "cameras": list(SIZES),
        "checkpoint": os.path.abspath(ckpt),
        "keys": ["images", "prompt", "state"],
        "frame_sizes": {c: [256, 256] for c in SIZES},
        "chunk": 8,
        "action_dim": 14,
        "proprio_dim": 14,
        "action_offset": 0,
        "instruction": None,
        "action_names": data.ACTION_NAMES,
    }
    answers = []
    for seed in range(3):
        obs = observation(seed)
        answers.append(c.infer(obs))
        assert_answers(answers[-1], policy, obs)
    assert np.abs(answers[0]["actions"] - answers[1]["actions"]).max() > 1e-4  # the inputs do reach the answer
    assert "prev_total_ms" in answers[-1]["server_timing"]


def without(obs, key):
    return {k: v for k, v in obs.items() if k != key}


BAD = [  # (observation, the start of the error the server answers)
    ([1, 2], "expected a dict observation with images, prompt, state, got list"),
    (without(observation(0), "images"), "images: expected a dict camera name -> HxWx3 uint8 array, got NoneType"),
    (
        observation(0) | {"images": {"head_camera_image": observation(0)["images"]["head_camera_image"]}},
        "images: missing camera(s) left_wrist_image (this policy reads head_camera_image, left_wrist_image; got "
        "head_camera_image)",
    ),
    (
        observation(0) | {"images": {c: x.astype(np.float32) for c, x in observation(0)["images"].items()}},
        "images['head_camera_image']: expected an HxWx3 uint8 RGB array, got float32 array of shape (240, 320, 3)",
    ),
    (
        observation(0) | {"images": {c: x[..., 0] for c, x in observation(0)["images"].items()}},
        "images['head_camera_image']: expected an HxWx3 uint8 RGB array, got uint8 array of shape (240, 320)",
    ),
    (without(observation(0), "prompt"), "prompt: expected the instruction as a non-blank str, got None"),
    (observation(0) | {"prompt": "  "}, "prompt: expected the instruction as a non-blank str, got '  '"),
    (
        without(observation(0), "state"),
        "state: this policy was trained with proprioception: expected the raw "
        "(14,) joint state, finite numbers, got NoneType",
    ),
    (
        observation(0) | {"state": np.zeros(7)},
        "state: this policy was trained with proprioception: expected the "
        "raw (14,) joint state, finite numbers, got float64 array of shape (7,)",
    ),
    (observation(0) | {"state": np.full(14, np.nan)}, "state: this policy was trained with proprioception"),
    (observation(0) | {"prompt": "word " * 3000}, "the instruction is too long"),
]


def test_bad_requests_get_an_error_and_the_next_request_works(server, policy):
    c, good = client(server), observation(1)
    for obs, message in BAD:
        with pytest.raises(RuntimeError, match="^Error in inference server:\nbad request: " + re.escape(message)):
            c.infer(obs)
        assert_answers(c.infer(good), policy, good)
    assert server.poll() is None and "Traceback" not in server.err.read_text()


def test_frames_that_are_no_msgpack_numpy_are_refused(server, policy):
    good, head = observation(0), {"Authorization": f"Api-Key {KEY}"}
    short = {b"__ndarray__": True, b"data": b"\0" * 10, b"dtype": "|u1", b"shape": [240, 320, 3]}
    objects = short | {b"dtype": "|O", b"shape": [10]}
    with connect(f"ws://127.0.0.1:{server.port}", additional_headers=head, compression=None, max_size=None) as ws:
        assert msgpack.unpackb(ws.recv())["cameras"] == list(SIZES)
        for frame, message in [
            (b"\xc1\x00", "the request is not msgpack-numpy: "),
            ('{"prompt": "json"}', "expected a binary frame holding a msgpack'd observation"),
            (
                msgpack_numpy.packb(good | {"images": {"head_camera_image": short}}),
                "the request is not msgpack-numpy: TypeError: buffer is too small",
            ),
            (
                msgpack_numpy.packb(good | {"images": {"head_camera_image": objects}}),
                "the request is not msgpack-numpy: ValueError: unsupported array dtype object",
            ),
        ]:
            ws.send(frame)
            assert ws.recv(timeout=30).startswith("bad request: " + message)
        ws.send(msgpack_numpy.packb(good))
        assert_answers(msgpack_numpy.unpackb(ws.recv(timeout=60)), policy, good)


def test_two_clients_in_turn_and_at_once(server, policy):
    a, b = client(server), client(server)
    obs = [observation(seed) for seed in (3, 4)]
    for _ in range(2):
        assert_answers(a.infer(obs[0]), policy, obs[0])
        assert_answers(b.infer(obs[1]), policy, obs[1])
    answers = {}  # both at once: the server queues one behind the other on the model
    threads = [
        threading.Thread(target=lambda i=i, c=c: answers.update({i: c.infer(obs[i])})) for i, c in enumerate((a, b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(2):
        assert_answers(answers[i], policy, obs[i])


def test_healthz_answers_200_without_a_key(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/healthz")
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"OK\n")
    conn.close()


@pytest.mark.parametrize("api_key", [None, "wrong"])
def test_a_missing_or_wrong_api_key_is_refused(server, api_key):
    with pytest.raises(websockets.InvalidStatus) as e:
        client(server, api_key)
    assert e.value.response.status_code == 401
    assert "refused, missing or wrong API key" in server.out.read_text()


def test_a_checkpoint_trained_with_instruction_needs_no_prompt(policy, ckpt):
    fixed = SimpleNamespace(
        cameras=policy.cameras,
        vla=policy.vla,
        frame_sizes=policy.frame_sizes,
        args=policy.args | {"instruction": "place the shoe"},
    )
    obs = observation(0)
    assert serve.parse(fixed, msgpack_numpy.packb(without(obs, "prompt")))[1] == "place the shoe"
    assert serve.parse(fixed, msgpack_numpy.packb(obs))[1] == obs["prompt"]
    with pytest.raises(ValueError, match="^prompt: expected the instruction as a non-blank str, got ''$"):
        serve.parse(fixed, msgpack_numpy.packb(obs | {"prompt": ""}))
    meta = serve.metadata(fixed, ckpt)
    assert meta["instruction"] == "place the shoe" and meta["keys"] == ["images", "state"]


def test_bad_flags_fail_in_one_line_before_the_model_loads(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit, match=f"^error: --checkpoint {tmp_path}/none: not a directory$"):
        serve.main(["--checkpoint", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        serve.main(["--checkpoint", ckpt, "--device", "tpu0"])
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(": error: --device tpu0: not a device (auto, cpu, cuda or cuda:N)")
    )
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(
            SystemExit, match=f"^error: cannot listen on --host 127.0.0.1 --port {port}: Address already in use$"
        ):
            serve.main(["--checkpoint", ckpt, "--port", str(port)])


def test_action_chunk_broker_executes_the_chunk_step_by_step(server, policy):
    broker = action_chunk_broker.ActionChunkBroker(client(server), action_horizon=3)
    obs = [observation(seed) for seed in range(4)]
    steps = [broker.infer(o) for o in obs]  # asks for a chunk at steps 0 and 3 only
    for t in range(3):
        np.testing.assert_allclose(steps[t]["actions"], expected(policy, obs[0])[t], rtol=0, atol=1e-6)
    np.testing.assert_allclose(steps[3]["actions"], expected(policy, obs[3])[0], rtol=0, atol=1e-6)


def test_sigterm_stops_it_with_one_line(server, policy):  # last: it ends the module's server
    c, obs = client(server), observation(5)
    assert_answers(c.infer(obs), policy, obs)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
    assert server.out.read_text().splitlines()[-1] == "stopped (SIGTERM)"
    assert server.err.read_text() == ""
    with pytest.raises(websockets.ConnectionClosed):
        c.infer(obs)
