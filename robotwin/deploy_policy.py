"""
nanoOFT as a RoboTwin 2.0 policy. From a RoboTwin checkout's root:

    ln -s /path/to/nanoOFT/robotwin policy/nanooft        # or copy it and set nanooft_path in deploy_policy.yml
    cd policy/nanooft && bash eval.sh place_shoe demo_clean /abs/path/out/shoe/step_050000 0 0

RoboTwin imports policy/nanooft as a package, calls get_model(deploy_policy.yml + overrides) once, reset_model at the
start of every episode and eval(TASK_ENV, model, observation) until success or the step limit.
"""

import importlib
import io
import os
import sys

import numpy as np
from PIL import Image

__all__ = ["get_model", "eval", "reset_model"]

# RoboTwin's camera -> the episode file's dataset (robotwin/convert.py and RoboTwin's OFT conversion agree)
CAMERAS = {
    "head_camera": "head_camera_image",
    "left_camera": "left_wrist_image",
    "right_camera": "right_wrist_image",
    "front_camera": "low_cam_image",
}


def import_nanooft(root):
    """nanoOFT's infer (with its data and model), although RoboTwin's root, which has a data/ directory of its own,
    comes first on sys.path and RoboTwin may have imported a `data` already."""
    root = os.path.realpath(root)
    if not os.path.isfile(os.path.join(root, "infer.py")):
        raise FileNotFoundError(
            f"nanooft_path {root}: no infer.py there; set nanooft_path in deploy_policy.yml to "
            "the nanoOFT checkout (needed when this folder was copied instead of linked)"
        )
    for name in ("data", "model", "infer"):
        module = sys.modules.get(name)
        if module is not None and os.path.dirname(os.path.realpath(getattr(module, "__file__", None) or "/")) != root:
            del sys.modules[name]  # someone else's `data`: ours must not resolve to it
    sys.path.insert(0, root)
    try:
        return importlib.import_module("infer")
    finally:
        sys.path.remove(root)


def get_model(usr_args):
    """A Policy from deploy_policy.yml's keys: checkpoint (default: ckpt_setting), execute, ensemble, device,
    jpeg_quality, nanooft_path."""
    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    infer = import_nanooft(usr_args.get("nanooft_path") or here)
    checkpoint = str(usr_args.get("checkpoint") or usr_args.get("ckpt_setting"))
    chunk, execute = infer.model.check_checkpoint(checkpoint)["chunk"], usr_args.get("execute", 8)
    if type(execute) is not int or not 1 <= execute <= chunk:  # before the model loads; -1 or 0 would never act
        raise ValueError(f"deploy_policy.yml: execute must be 1..{chunk} (the chunk of {checkpoint}), got {execute!r}")
    policy = infer.Policy.from_checkpoint(
        checkpoint,
        device=usr_args.get("device") or "cuda",
        execute=execute,
        ensemble=bool(usr_args.get("ensemble")),
    )
    # frames that went through JPEG in the training data (RoboTwin's OFT conversion) go through it live too
    policy.jpeg_quality = usr_args.get("jpeg_quality")
    unknown = sorted(set(policy.cameras) - set(CAMERAS.values()))
    if unknown:
        raise ValueError(f"{checkpoint}: cameras {', '.join(unknown)} have no RoboTwin camera; known: {CAMERAS}")
    print(
        f"nanoOFT: {checkpoint}, cameras {policy.cameras}, execute {policy.execute}, ensemble {policy.ensemble}, "
        f"proprio {bool(policy.vla.proprio_dim)}"
    )
    return policy


def eval(TASK_ENV, model, observation):
    """Execute `execute` actions, one re-plan's worth (or `execute` ensembled steps), fetching a fresh observation
    after each action as RoboTwin's template does: absolute joint targets, 6 joints + gripper per arm."""
    # train.py --instruction when it trained on one, else the task's (unseen by default: instruction_type)
    instruction = model.args.get("instruction") or TASK_ENV.get_instruction()
    ours = {name: cam for cam, name in CAMERAS.items()}
    for _ in range(model.execute):
        present, wanted = observation["observation"], [ours[c] for c in model.cameras]
        if set(wanted) - set(present):  # a task config without that camera
            raise ValueError(
                f"nanoOFT: the observation has no {', '.join(sorted(set(wanted) - set(present)))} (the "
                f"checkpoint reads {', '.join(wanted)}); it has {', '.join(present)}"
            )
        # 240x320 RGB
        images = {c: jpeg_round_trip(present[ours[c]]["rgb"], model.jpeg_quality) for c in model.cameras}
        state = observation["joint_action"]["vector"] if model.vla.proprio_dim else None
        TASK_ENV.take_action(model.act(images, instruction, state), action_type="qpos")
        observation = TASK_ENV.get_obs()


def jpeg_round_trip(frame, quality):
    """The frame encoded as a JPEG at `quality` and decoded again (None: the frame as it is)."""
    if not quality:
        return frame
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def reset_model(model):
    model.reset()
