"""
Serve a trained policy over openpi's websocket protocol, so robot code written for openpi's clients connects as is.

    python serve.py --checkpoint out/demo/step_000500                   # ws://127.0.0.1:8000, GPU when there is one
    python serve.py --checkpoint CKPT --host 0.0.0.0 --api_key SECRET   # reachable from the robot, key required
    python serve.py --checkpoint CKPT --device cpu --dtype bfloat16     # a 7B policy on a CPU (15 GB, not 30)

On connect the server sends one binary frame, the msgpack'd metadata (cameras, chunk, action_dim, ...); then every
binary frame from the client is a msgpack-numpy observation {"images": {camera: HxWx3 uint8}, "prompt": str,
"state": (proprio_dim,) when trained with --proprio}, answered with {"actions": (chunk, action_dim) float32 in raw
units, "server_timing": {"infer_ms": ...}}, or with a text frame naming what is wrong. On the robot
(pip install openpi-client==0.1.2; beside this project's numpy 2 with --no-deps, see docs/serving.md):

    from openpi_client import websocket_client_policy
    policy = websocket_client_policy.WebsocketClientPolicy("gpu-box", 8000)
    actions = policy.infer({"images": {"head_camera_image": rgb}, "prompt": "place the shoe"})["actions"]

GET /healthz answers 200 (without a key). Requests of all clients are served one at a time on the model. What one
client may ask is bounded, each limit a flag (docs/serving.md has the table): --max_message_mb 32, --max_frame_pixels
2073600 (full HD), --max_prompt_chars 2000 (checked before the tokenizer, which holds the GIL), --max_connections 8,
--idle_timeout 300 seconds; each refusal is one line to the client and one on stdout. SIGTERM or Ctrl-C answers the
requests in hand, then closes the connections (code 1001) and exits 0.
"""

import argparse
import asyncio
import hmac
import http
import math
import os
import resource
import signal
import socket
import sys
import time
import traceback

import msgpack
import numpy as np
import torch
import websockets
from websockets.asyncio.server import serve
from websockets.frames import CloseCode

import data
import infer
import model


def pack_array(obj):
    """msgpack-numpy's wire form of arrays and numpy scalars, as openpi-client reads it."""
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def unpack_array(obj):
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.hasobject or dtype.kind == "V":  # object and structured arrays are no camera frame or state
            raise ValueError(f"unsupported array dtype {dtype}")
        return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj):
    return msgpack.packb(obj, default=pack_array)


def describe(x):
    return f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__


def expected_keys(policy):
    """The keys a request must hold: a checkpoint trained with --instruction has that as its default prompt."""
    return ["images"] + ["prompt"] * (not policy.args.get("instruction")) + ["state"] * bool(policy.vla.proprio_dim)


def metadata(policy, checkpoint):
    vla = policy.vla
    return {
        "cameras": policy.cameras,
        "checkpoint": os.path.abspath(checkpoint),
        "keys": expected_keys(policy),
        "frame_sizes": {c: list(policy.frame_sizes[c]) for c in policy.cameras},
        "chunk": vla.chunk,
        "action_dim": vla.action_dim,
        "proprio_dim": vla.proprio_dim,
        "action_offset": policy.args["action_offset"],
        "instruction": policy.args.get("instruction"),
        "action_names": data.action_names(vla.action_dim),
    }


# Limits on what one client may ask of the server (each a flag; docs/serving.md gives the reasons):
MAX_MESSAGE_MB = 32  # four full-HD frames (6 MB each) and change; openpi's clients send one frame per camera
MAX_FRAME_PIXELS = 1920 * 1080  # full HD: the policy squashes every frame to its training size (256x256) anyway
MAX_PROMPT_CHARS = 2000  # an instruction is a sentence (RoboTwin's, LIBERO's, ALOHA's: under 200 characters)
MAX_CONNECTIONS = 8  # robots served one request at a time on one model: eight already share it
IDLE_TIMEOUT = 300  # seconds without a request before a connection is closed: longer than an episode's pauses
ECHOED_KEYS, ECHOED_CHARS = 5, 40  # an error names at most this much of what the client sent


def echo(keys):
    """At most ECHOED_KEYS of the keys a client sent, each cut to ECHOED_CHARS: an error never repeats a request."""
    keys = [str(k) for k in keys]
    shown = [k if len(k) <= ECHOED_CHARS else k[: ECHOED_CHARS - 3] + "..." for k in keys[:ECHOED_KEYS]]
    return ", ".join(shown) + (f" and {len(keys) - ECHOED_KEYS} more" if len(keys) > ECHOED_KEYS else "")


def parse(policy, message, max_prompt_chars=MAX_PROMPT_CHARS, max_frame_pixels=MAX_FRAME_PIXELS):
    """The (images, prompt, state) of one request, or a ValueError naming what is wrong with it. Keys and cameras
    the policy does not read are ignored, as openpi's policies do; no prompt means the checkpoint's --instruction.
    The prompt's length is checked here, before the tokenizer (which holds the GIL: 17 s for 10 MB) sees it."""
    if isinstance(message, str):
        raise ValueError("expected a binary frame holding a msgpack'd observation, got a text frame")
    try:
        obs = msgpack.unpackb(message, object_hook=unpack_array)
    except Exception as e:  # msgpack's own errors, a dtype numpy does not know, data too short for the shape
        raise ValueError(f"the request is not msgpack-numpy: {type(e).__name__}: {str(e):.200}") from None
    if not isinstance(obs, dict):
        raise ValueError(f"expected a dict observation with {', '.join(expected_keys(policy))}, got {describe(obs)}")
    images = obs.get("images")
    if not isinstance(images, dict):
        raise ValueError(f"images: expected a dict camera name -> HxWx3 uint8 array, got {describe(images)}")
    missing = [c for c in policy.cameras if c not in images]
    if missing:
        raise ValueError(
            f"images: missing camera(s) {', '.join(missing)} (this policy reads "
            f"{', '.join(policy.cameras)}; got {echo(images) or 'none'})"
        )
    for c in policy.cameras:
        x = images[c]
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3 or not x.size:
            raise ValueError(f"images[{c!r}]: expected an HxWx3 uint8 RGB array, got {describe(x)}")
        if x.shape[0] * x.shape[1] > max_frame_pixels:
            raise ValueError(
                f"images[{c!r}]: a {x.shape[0]}x{x.shape[1]} frame, {x.shape[0] * x.shape[1]:,} pixels, more than "
                f"--max_frame_pixels {max_frame_pixels:,}"
            )
    prompt = obs.get("prompt")
    prompt = policy.args.get("instruction") if prompt is None else prompt  # as Policy.predict's default
    if isinstance(prompt, str) and len(prompt) > max_prompt_chars:
        raise ValueError(
            f"prompt: {len(prompt):,} characters, more than --max_prompt_chars {max_prompt_chars:,} (an instruction "
            "is a sentence or two)"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt: expected the instruction as a non-blank str, got {obs.get('prompt')!r:.60}")
    state, dim = obs.get("state"), policy.vla.proprio_dim
    if dim:
        try:
            state = np.asarray(state, np.float64)
        except (TypeError, ValueError):
            state = None
        if state is None or state.shape != (dim,) or not np.isfinite(state).all():
            raise ValueError(
                f"state: this policy was trained with proprioception: expected the raw ({dim},) joint "
                f"state, finite numbers, got {describe(obs.get('state'))}"
            )
    return images, prompt, state if dim else None


def address(ws):
    return "{}:{}".format(*ws.remote_address[:2])


class Server:
    """The policy served to every client: requests run one at a time on the model in a worker thread, so the event
    loop keeps answering pings, handshakes and health checks meanwhile. What a client may ask is bounded by `limits`
    (serve.py's flags), each refusal one line to the client and one to stdout."""

    def __init__(self, policy, meta, api_key=None, **limits):
        self.policy, self.meta, self.hello, self.api_key = policy, meta, packb(meta), api_key
        self.limits = dict(
            max_message_mb=MAX_MESSAGE_MB,
            max_frame_pixels=MAX_FRAME_PIXELS,
            max_prompt_chars=MAX_PROMPT_CHARS,
            max_connections=MAX_CONNECTIONS,
            idle_timeout=IDLE_TIMEOUT,
        )
        self.limits.update(limits)
        self.connections = set()  # accepted websockets, counted against --max_connections
        self.answering = 0  # requests received and not answered yet: a stop waits for them
        self.stopping = False
        self.accept_error_at = -math.inf  # when the last "cannot accept connections" line was printed
        self.lock = None  # one request at a time on the model: an asyncio.Lock, made in run()'s event loop

    def predict(self, images, prompt, state):
        t0 = time.perf_counter()
        actions = self.policy.predict(images, prompt, state).astype(np.float32)
        return actions, 1000 * (time.perf_counter() - t0)

    async def answer(self, message, client, prev_total):
        """The frame that answers one request: the chunk, or a text line naming what went wrong."""
        limits = {k: self.limits[k] for k in ("max_prompt_chars", "max_frame_pixels")}
        try:
            request = parse(self.policy, message, **limits)
            async with self.lock:
                actions, infer_ms = await asyncio.to_thread(self.predict, *request)
        except ValueError as e:
            print(f"{client}: bad request: {e}", flush=True)
            return f"bad request: {e}"
        except Exception as e:  # a failure inside the model: this request fails, the server keeps serving
            traceback.print_exc()
            return f"inference failed: {type(e).__name__}: {str(e):.500}"
        timing = {"infer_ms": infer_ms} | ({"prev_total_ms": prev_total} if prev_total is not None else {})
        return packb({"actions": actions, "server_timing": timing})

    async def next_request(self, ws, client):
        """The client's next message, or None once it has sent nothing for --idle_timeout seconds (then closed)."""
        idle = self.limits["idle_timeout"]
        try:
            return await asyncio.wait_for(ws.recv(), idle)
        except TimeoutError:
            print(f"{client}: closed, no request for {idle:g} s (--idle_timeout)", flush=True)
            await ws.close(CloseCode.NORMAL_CLOSURE, f"no request for {idle:g} s (--idle_timeout): reconnect")
            return None

    async def handler(self, ws):
        client, served, prev_total = address(ws), 0, None
        print(f"{client} connected", flush=True)
        try:
            await ws.send(self.hello)
            while (message := await self.next_request(ws, client)) is not None:
                if self.stopping:  # the server closes this connection once the requests in hand are answered
                    continue
                t0 = time.perf_counter()
                self.answering += 1
                try:
                    reply = await self.answer(message, client, prev_total)
                    await ws.send(reply)
                finally:
                    self.answering -= 1
                if isinstance(reply, bytes):
                    served, prev_total = served + 1, 1000 * (time.perf_counter() - t0)
        except websockets.ConnectionClosed as e:
            if e.sent and e.sent.code == CloseCode.MESSAGE_TOO_BIG:
                print(
                    f"{client}: refused a message over --max_message_mb {self.limits['max_message_mb']:g} "
                    f"({e.sent.reason})",
                    flush=True,
                )
        print(f"{client} disconnected after {served} chunk(s)", flush=True)

    def process_request(self, ws, request):
        """Before the handshake: /healthz, the API key, --max_connections."""
        if request.path == "/healthz":  # for load balancers and start-up scripts, which hold no key
            return ws.respond(http.HTTPStatus.OK, "OK\n")
        client, most = address(ws), self.limits["max_connections"]
        # bytes: compare_digest refuses non-ASCII str
        given = [h.encode() for h in request.headers.get_all("Authorization")]
        if self.api_key and len(given) > 1:
            print(f"{client}: refused, {len(given)} Authorization headers", flush=True)
            return ws.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if self.api_key and not (given and hmac.compare_digest(given[0], f"Api-Key {self.api_key}".encode())):
            print(f"{client}: refused, missing or wrong API key", flush=True)
            return ws.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if len(self.connections) >= most:
            print(f"{client}: refused, --max_connections {most} reached", flush=True)
            return ws.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, f"server full (--max_connections {most}); try later\n"
            )
        self.connections.add(ws)
        asyncio.ensure_future(ws.wait_closed()).add_done_callback(lambda _: self.connections.discard(ws))
        return None

    def on_loop_error(self, loop, context):
        """asyncio logs a traceback for every accept() that fails for want of file descriptors (a low ulimit -n),
        hundreds a second: one line a minute says it instead."""
        error = context.get("exception")
        if not (isinstance(error, OSError) and context.get("message", "").startswith("socket.accept()")):
            return loop.default_exception_handler(context)
        if time.monotonic() - self.accept_error_at >= 60:
            self.accept_error_at = time.monotonic()
            fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            print(
                f"cannot accept connections: {error.strerror} (ulimit -n {fds}; open connections: "
                f"{len(self.connections)}); retrying, said again in a minute if it lasts",
                flush=True,
            )

    async def run(self, sock):
        """Serve until SIGINT or SIGTERM; returns the signal's name. Requests already received are answered first."""
        loop = asyncio.get_running_loop()
        self.lock, stop = asyncio.Lock(), loop.create_future()

        def on_signal(name):
            if not stop.done():
                stop.set_result(name)

        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, on_signal, s.name)
        loop.set_exception_handler(self.on_loop_error)
        # no compression, as openpi's server (camera frames hardly compress); a connection holds one message at most
        max_size = int(self.limits["max_message_mb"] * 2**20)
        options = dict(compression=None, max_size=max_size, max_queue=1, process_request=self.process_request)
        async with serve(self.handler, sock=sock, **options):
            host, port = sock.getsockname()[:2]
            meta = self.meta
            print(
                f"serving {meta['checkpoint']} on ws://{host}:{port} ({', '.join(self.policy.cameras)} | chunk "
                f"{meta['chunk']} x {meta['action_dim']} | proprio {meta['proprio_dim']} | {self.policy.device}"
                f"{' | API key required' if self.api_key else ''}); Ctrl-C stops",
                flush=True,
            )
            stopped_by = await stop
            self.stopping = True
            while self.answering:  # the chunks in hand are computed and sent before the connections close
                await asyncio.sleep(0.01)
        return stopped_by


def api_key(args):
    """The key clients must send: --api_key, else $NANOOFT_API_KEY, stripped (HTTP drops a header's outer blanks, so
    a trailing one would lock every client out); None serves without one. A blank key is a mistake, not no key."""
    if args.api_key is not None:
        key, where = args.api_key, "--api_key"
    elif "NANOOFT_API_KEY" in os.environ:
        key, where = os.environ["NANOOFT_API_KEY"], "NANOOFT_API_KEY"
    else:
        return None
    if not key.strip():
        sys.exit(f"error: {where} is set but {'empty' if not key else 'blank'}: give a key, or none to serve without")
    if not (key.isascii() and key.isprintable()):
        sys.exit(f"error: {where}: only printable ASCII characters travel in an HTTP header")
    return key.strip()


def add_limits(p):
    """The flags bounding what one client may ask of the server; docs/serving.md says why each default."""
    p.add_argument("--max_message_mb", type=float, default=MAX_MESSAGE_MB, help="largest request, in MiB (%(default)s)")
    p.add_argument(
        "--max_frame_pixels", type=int, default=MAX_FRAME_PIXELS, help="largest frame, height x width (%(default)s)"
    )
    p.add_argument("--max_prompt_chars", type=int, default=MAX_PROMPT_CHARS, help="longest prompt (%(default)s)")
    p.add_argument("--max_connections", type=int, default=MAX_CONNECTIONS, help="clients at once (%(default)s)")
    p.add_argument(
        "--idle_timeout",
        type=float,
        default=IDLE_TIMEOUT,
        help="seconds a connection may send no request before it is closed (%(default)s)",
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_NNNNNN directory or a merged export")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept connections from other machines")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the line at start names it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--api_key",
        help="refuse clients without `Authorization: Api-Key KEY` (default: $NANOOFT_API_KEY, which keeps the key "
        "out of the process list)",
    )
    p.add_argument("--vla_path", help="base model, overriding the one named in the checkpoint's args.json")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="the weights' dtype (and autocast's); auto: bfloat16 on CUDA, float32 on CPU, where a 7B policy "
        "needs bfloat16 to fit in 24 GB (30 GB in float32)",
    )
    add_limits(p)
    args = p.parse_args(argv)
    key = api_key(args)
    limits = {k: getattr(args, k) for k in ("max_message_mb", "max_frame_pixels", "max_prompt_chars")}
    limits |= {k: getattr(args, k) for k in ("max_connections", "idle_timeout")}
    if bad := next((k for k, v in limits.items() if not v > 0), None):
        p.error(f"--{bad} must be positive, got {limits[bad]:g}")
    if not os.path.isdir(args.checkpoint):
        sys.exit(f"error: --checkpoint {args.checkpoint}: not a directory")
    try:
        model.check_checkpoint(args.checkpoint)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    try:
        device = torch.device("cpu" if args.device == "auto" else args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible to torch {torch.__version__}")
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart needs no wait for the old TIME_WAITs
    try:  # before the model loads (minutes for 7B): a taken port is known at once
        sock.bind((args.host, args.port))
        sock.listen()
    except OSError as e:
        sock.close()
        sys.exit(f"error: cannot listen on --host {args.host} --port {args.port}: {e.strerror or e}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"warning: serving on {args.host} without --api_key: anyone who reaches the port can use the policy")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM while loading ends as Ctrl-C does
    # the cores other work leaves free, not torch's default of all of them (oversubscribed, a chunk takes ~4x longer)
    torch.set_num_threads(infer.cpu_threads())
    try:
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        policy = infer.Policy.from_checkpoint(
            args.checkpoint, device=args.device, vla_path=args.vla_path, dtype=dtype, merge=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("stopped while loading the checkpoint", file=sys.stderr)
        sys.exit(130)
    server = Server(policy, metadata(policy, args.checkpoint), key, **limits)
    print(f"stopped ({asyncio.run(server.run(sock))})", flush=True)


if __name__ == "__main__":
    main()
