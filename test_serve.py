"""
serve.py against openpi's own client: the metadata, actions equal to Policy.predict's, bad requests, several clients,
/healthz, the API key, the limits on what one client may ask (message size, frame pixels, prompt length, connections,
idle time, file descriptors) and SIGTERM, on a tiny checkpoint trained for one step. Loopback only, CPU only.

    pip install -r requirements.txt -r requirements-serve.txt
    pip install --no-deps openpi-client==0.1.2 dm-tree==0.1.10
    python -m pytest -q test_serve.py
"""

import http.client
import os
import re
import resource
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
# every test here needs a checkpoint trained by train.py in a subprocess, most a serve.py process: all are slow
pytestmark = [
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"),
    pytest.mark.slow,
]
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


def start(ckpt, logs, *flags, env=ENV, program=("serve.py",)):
    """serve.py on a free loopback port, once it says it serves; its stdout and stderr go to logs/out and logs/err."""
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, *program, "--checkpoint", ckpt, "--port", "0", "--device", "cpu", *flags],
            cwd=HERE,
            env=env,
            stdout=out,
            stderr=err,
        )
    deadline = time.time() + 120
    while not (m := re.search(r"on ws://127\.0\.0\.1:(\d+) ", (logs / "out").read_text())):
        assert proc.poll() is None, (logs / "err").read_text()[-3000:]
        assert time.time() < deadline, "serve.py did not start within 120 s"
        time.sleep(0.2)
    proc.port, proc.out, proc.err = int(m[1]), logs / "out", logs / "err"
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    proc = start(ckpt, tmp_path_factory.mktemp("logs"), "--api_key", KEY)
    yield proc
    stop(proc)


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


OPEN = []  # openpi's client has no close(): its connection lives as long as its receiving thread, past the test


def client(server, api_key=KEY):
    c = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.port, api_key=api_key)
    OPEN.append(c)
    return c


@pytest.fixture(autouse=True)
def close_clients():
    """Each test's connections are closed after it, as a robot's would be: --max_connections counts open ones."""
    yield
    while OPEN:
        OPEN.pop()._ws.close()


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
    # under --max_prompt_chars, too many tokens for the LLM: byte-fallback characters are two tokens each here
    (observation(0) | {"prompt": "ü" * 1000}, "the instruction is too long: 2015 prompt tokens"),
    (
        observation(0) | {"prompt": "x" * 2001},
        "prompt: 2,001 characters, more than --max_prompt_chars 2,000 (an instruction is a sentence or two)",
    ),
    (  # what the client sent is echoed in part: the first 5 names, 40 characters at most each
        observation(0) | {"images": {f"cam_{i}_" + "x" * 100: np.zeros((1, 1, 3), np.uint8) for i in range(1000)}},
        "images: missing camera(s) head_camera_image, left_wrist_image (this policy reads head_camera_image, "
        f"left_wrist_image; got {', '.join(f'cam_{i}_' + 'x' * 31 + '...' for i in range(5))} and 995 more)",
    ),
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


@pytest.fixture(scope="module")
def limited(ckpt, tmp_path_factory):
    """Every limit low, and the key from the environment with a trailing blank (as read from a file)."""
    limits = ["--max_message_mb", "1", "--max_frame_pixels", "100000", "--max_prompt_chars", "100"]
    limits += ["--max_connections", "2", "--idle_timeout", "3"]
    env = ENV | {"NANOOFT_API_KEY": KEY + " "}
    proc = start(ckpt, tmp_path_factory.mktemp("limited"), *limits, env=env)
    yield proc
    stop(proc)


def test_each_limit_is_refused_in_one_line(limited, policy):
    c, obs = client(limited), observation(0)  # the key without the blank the server was given
    assert_answers(c.infer(obs), policy, obs)
    big = {"head_camera_image": np.zeros((400, 400, 3), np.uint8)}
    for request, message in [
        (
            obs | {"images": obs["images"] | big},
            "images['head_camera_image']: a 400x400 frame, 160,000 pixels, more than --max_frame_pixels 100,000",
        ),
        (
            obs | {"prompt": "x" * 101},
            "prompt: 101 characters, more than --max_prompt_chars 100 (an instruction is a sentence or two)",
        ),
    ]:
        with pytest.raises(RuntimeError, match="^Error in inference server:\nbad request: " + re.escape(message) + "$"):
            c.infer(request)
        assert limited.out.read_text().splitlines()[-1].endswith(f": bad request: {message}")
    assert_answers(c.infer(obs), policy, obs)
    with pytest.raises(websockets.ConnectionClosedError) as e:  # 2 MiB: read no further than its header
        c.infer(obs | {"padding": np.zeros(2 << 20, np.uint8)})
    assert e.value.rcvd.code == 1009 and "\n" not in str(e.value)
    deadline = time.time() + 10
    while "refused a message" not in limited.out.read_text():
        assert time.time() < deadline
        time.sleep(0.1)
    assert re.search(r": refused a message over --max_message_mb 1 \(.*1048576.*\)\n", limited.out.read_text())
    assert_answers(client(limited).infer(obs), policy, obs)  # a new connection is served
    assert limited.err.read_text() == ""


def connect_within(server, seconds):
    """A client, once the server has noticed that earlier ones closed (it counts them against --max_connections)."""
    deadline = time.time() + seconds
    while True:
        try:
            return client(server)
        except websockets.InvalidStatus:
            assert time.time() < deadline, "the server kept refusing"
            time.sleep(0.1)


def test_connections_beyond_max_connections_are_refused_with_503(limited, policy):
    a, b = connect_within(limited, 10), connect_within(limited, 10)
    with pytest.raises(websockets.InvalidStatus) as e:
        client(limited)
    assert e.value.response.status_code == 503
    assert e.value.response.body == b"server full (--max_connections 2); try later\n"
    assert limited.out.read_text().splitlines()[-1].endswith(": refused, --max_connections 2 reached")
    assert_answers(b.infer(observation(1)), policy, observation(1))  # the two open ones are served
    a._ws.close()
    assert_answers(connect_within(limited, 10).infer(observation(2)), policy, observation(2))


def test_an_idle_connection_is_closed_after_idle_timeout(limited):
    head = {"Authorization": f"Api-Key {KEY}"}
    with connect(f"ws://127.0.0.1:{limited.port}", additional_headers=head, compression=None, max_size=None) as ws:
        ws.recv(timeout=30)  # the metadata
        t0 = time.time()
        with pytest.raises(websockets.ConnectionClosedOK) as e:
            ws.recv(timeout=30)
    assert 2.5 < time.time() - t0 < 20
    assert (e.value.rcvd.code, e.value.rcvd.reason) == (1000, "no request for 3 s (--idle_timeout): reconnect")
    assert ": closed, no request for 3 s (--idle_timeout)" in limited.out.read_text()


@pytest.mark.parametrize(
    "env, flags, message",
    [
        ({"NANOOFT_API_KEY": ""}, [], "error: NANOOFT_API_KEY is set but empty: give a key, or none to serve without"),
        (
            {"NANOOFT_API_KEY": "  "},
            [],
            "error: NANOOFT_API_KEY is set but blank: give a key, or none to serve without",
        ),
        ({}, ["--api_key", " "], "error: --api_key is set but blank: give a key, or none to serve without"),
        ({}, ["--api_key", "kéy"], "error: --api_key: only printable ASCII characters travel in an HTTP header"),
    ],
)
def test_an_empty_or_blank_api_key_is_refused_before_the_model_loads(ckpt, env, flags, message):
    """Not served without a key: someone who set one meant to have one."""
    r = subprocess.run(
        [sys.executable, "serve.py", "--checkpoint", ckpt, "--port", "0", "--device", "cpu", *flags],
        cwd=HERE,
        env=ENV | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout, r.stderr) == (1, "", message + "\n")


SLOW_PREDICT = """
import sys, time
import infer, serve

predict = infer.Policy.predict


def slow(self, *args, **kwargs):
    print("predicting", flush=True)
    time.sleep(3)
    return predict(self, *args, **kwargs)


infer.Policy.predict = slow
serve.main(sys.argv[1:])
"""


def test_sigterm_sends_the_chunk_being_computed_before_it_stops(ckpt, policy, tmp_path):
    proc = start(ckpt, tmp_path, program=("-c", SLOW_PREDICT))
    try:
        c, obs, answers = client(proc, None), observation(6), []
        asking = threading.Thread(target=lambda: answers.append(c.infer(obs)))
        asking.start()
        deadline = time.time() + 60
        while "predicting" not in proc.out.read_text():
            assert time.time() < deadline and asking.is_alive()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        asking.join(timeout=60)
        assert len(answers) == 1, proc.out.read_text()
        assert_answers(answers[0], policy, obs)
        assert proc.wait(timeout=60) == 0
        assert proc.out.read_text().splitlines()[-1] == "stopped (SIGTERM)"
        assert proc.err.read_text() == ""
    finally:
        stop(proc)


def healthz_latencies(port, until):
    """Seconds each GET /healthz took, asked one after another until `until` is set."""
    latencies = []
    while not until.is_set():
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    return latencies


def test_a_10_mb_prompt_is_refused_by_length_while_healthz_answers(server, policy):
    """Tokenizing 10 MB holds the GIL for ~17 s here: the server would answer nothing, /healthz included."""
    c, done, latencies = client(server), threading.Event(), []
    poller = threading.Thread(target=lambda: latencies.extend(healthz_latencies(server.port, done)))
    poller.start()
    try:
        time.sleep(0.3)
        with pytest.raises(RuntimeError) as refused:
            c.infer(observation(0) | {"prompt": "place the shoe " * 666_666 + "on the mat"})
        time.sleep(0.3)
    finally:
        done.set()
        poller.join(timeout=120)
    assert len(latencies) >= 3 and max(latencies) < 1, latencies
    assert str(refused.value) == (
        "Error in inference server:\nbad request: prompt: 10,000,000 characters, more than --max_prompt_chars 2,000 "
        "(an instruction is a sentence or two)"
    )
    assert_answers(c.infer(observation(1)), policy, observation(1))
    log = server.out.read_text().splitlines()
    assert log[-1].endswith(
        ": bad request: prompt: 10,000,000 characters, more than --max_prompt_chars 2,000 (an "
        "instruction is a sentence or two)"
    )


def upgrade(port, headers):
    """A websocket handshake by hand: (status, body) of the server's answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("GET", "/")
    for k, v in [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        *headers,
    ]:
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    answer = r.status, r.read() if r.status != 101 else b""
    conn.close()
    return answer


def test_two_authorization_headers_are_refused_with_401(server):
    good = ("Authorization", f"Api-Key {KEY}")
    assert upgrade(server.port, [good])[0] == 101
    for headers in [[good, good], [good, ("Authorization", "Api-Key wrong")]]:
        assert upgrade(server.port, headers) == (401, b"missing or wrong API key\n")
    assert server.out.read_text().splitlines()[-1].endswith(": refused, 2 Authorization headers")
    assert "Traceback" not in server.err.read_text()


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_out_of_file_descriptors_is_one_line_a_minute_and_it_recovers(server, policy):
    """Under a low `ulimit -n`, asyncio logs a traceback for every accept() that fails, every second."""
    err, out = len(server.err.read_text()), len(server.out.read_text().splitlines())
    limits = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    limit = open_fds(server.pid) + 2
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (limit, limits[1]))
    try:
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(8)]
        time.sleep(3.5)  # the accepts are retried every second
        for sock in socks:
            sock.close()
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, limits)
    assert server.err.read_text()[err:] == ""
    lines = server.out.read_text().splitlines()[out:]
    said = [line for line in lines if "accept" in line]
    assert len(said) == 1 and re.fullmatch(
        f"cannot accept connections: Too many open files \\(ulimit -n {limit}; open connections: \\d+\\); retrying, "
        "said again in a minute if it lasts",
        said[0],
    ), lines
    deadline = time.time() + 30  # the refused sockets are closed by then, the limit restored
    while True:
        try:
            c = client(server)
            break
        except (OSError, websockets.InvalidHandshake):
            assert time.time() < deadline
            time.sleep(0.5)
    assert_answers(c.infer(observation(2)), policy, observation(2))


def test_sigterm_stops_it_with_one_line(server, policy):  # last: it ends the module's server
    c, obs = client(server), observation(5)
    assert_answers(c.infer(obs), policy, obs)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
    assert server.out.read_text().splitlines()[-1] == "stopped (SIGTERM)"
    assert server.err.read_text() == ""
    with pytest.raises(websockets.ConnectionClosed):
        c.infer(obs)
