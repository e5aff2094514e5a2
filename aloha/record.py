"""
ACT's scripted demonstrations in the ALOHA simulator (gym-aloha), written in ACT's HDF5 layout.

$ python aloha/record.py out/aloha/transfer_cube --task transfer_cube --episodes 50 --seed 0 [--size 240x320]

Per episode, as ACT's record_sim_episodes.py: a waypoint policy drives the end-effector (mocap) version of the task, its
joint trajectory (the grippers replaced by their normalized command) is replayed in the joint-space task from the same
object pose, and the replay's observations are stored. Only replays that reach reward 4 are kept; a failed one moves on
to the next seed. With --noise the replay's arms execute the targets plus a slow random walk and the file stores the
targets: demonstrations that start from off the path and return to it (DART). OUT/episode_N.hdf5:
observations/images/NAME (T, H, W, 3) uint8 for each camera of --cameras (ACT's top; or e.g.
top,left_wrist,right_wrist), observations/qpos and observations/qvel (T, 14), action (T, 14) float32, frame t being the
observation before action[t]; observations/object_xy (T, 2 per object) float32, where the objects start (the same
row in every frame: the state of a policy told where they are, and aloha/locate.py's labels) and
observations/qpos_object_xy, the two side by side (T, 14 + 2 per object: a located policy that feels its arms too);
root attributes sim=True, task, seed, object_pose, render, zoom, noise. A file is written under a temporary name and
renamed when whole, so a re-run skips finished episodes and redoes an interrupted one; it refuses episodes recorded
with another --task, --cameras, --size, --stock_render, --compression, --zoom or --noise (use another OUT). A run
holds OUT/.lock while it records: a second run into the same OUT is refused. A line per seed tried; on a terminal a
progress bar with the ETA under them, in a log file each episode's line ends with the time elapsed and the ETA.
Rendering is headless: MUJOCO_GL=egl (the default here; Mesa's libegl1 + libgl1-mesa-dri) or MUJOCO_GL=osmesa
(libosmesa6). The fast settings (no multisampling, no shadows) render about 10x faster than the stock scene.
"""

import argparse
import fcntl
import glob
import os
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")  # headless; must be set before mujoco is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: progress.py

import h5py
import numpy as np

from progress import Progress

TASKS = ("transfer_cube", "insertion")
EPISODE_LEN = 400  # ACT's and LeRobot's episode length (gym-aloha registers 300, too short for insertion)
CAMERAS = ("top",)  # the camera ACT's sim data sets record (--cameras adds the wrists, for instance)
# MuJoCo 3 weighs a weld's rotation by torquescale (google-deepmind/mujoco#1483): gym-aloha's XMLs predate that, and
# with them the wrists do not follow the mocap orientation. sqrt(rotational / translational inverse weight) restores
# mujoco 2.3.7's joint trajectories (within 0.0012 rad).
WELD_TORQUESCALE = 19.95
GRIPPER_CLOSE, GRIPPER_OPEN = 0.01844, 0.05800  # the puppet gripper's finger positions (gym-aloha's constants)
GRIPPERS = [6, 13]  # the grippers' columns of the 14-D joint vector (left arm 0-6, right arm 7-13)
# --noise's random walk forgets its past over this many control steps (1 s at 50 Hz): slow enough that the arm follows
# it off the scripted path (the position servos would filter out noise drawn anew every 20 ms), fast enough to change
# several times an episode
NOISE_STEPS = 50


def make_sim(task, end_effector=False, fast_render=True, weld_fix=True, zoom=1.0):
    """(physics, task object) of one gym-aloha task, in joint space or (end_effector) driven by mocap welds.
    zoom > 1 narrows every camera's field of view: the centre 1/zoom of the stock frame fills it."""
    from dm_control import mujoco
    from gym_aloha.constants import ASSETS_DIR
    from gym_aloha.tasks import sim, sim_end_effector

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use {', '.join(TASKS)}")
    xml = f"bimanual_viperx_{'end_effector_' if end_effector else ''}{task}.xml"
    physics = mujoco.Physics.from_xml_path(str(ASSETS_DIR / xml))
    physics.legacy_step = True  # as dm_control's control.Environment, which gym-aloha steps through
    if fast_render:  # before the first render: the offscreen context is made with these
        physics.model.vis.quality.offsamples = 0
        physics.model.light_castshadow[:] = 0
    if zoom != 1.0:
        physics.model.cam_fovy[:] = np.degrees(2 * np.arctan(np.tan(np.radians(physics.model.cam_fovy) / 2) / zoom))
    if end_effector and weld_fix:
        physics.model.eq_data[:, 10] = WELD_TORQUESCALE
    names = {"transfer_cube": ("TransferCube", sim.TransferCubeTask), "insertion": ("Insertion", sim.InsertionTask)}
    prefix, joint_task = names[task]
    return physics, getattr(sim_end_effector, f"{prefix}EndEffectorTask")() if end_effector else joint_task()


def object_pose(task, seed):
    """The objects' initial pose(s) for a seed, exactly as gym-aloha's reset(seed=seed) draws them."""
    from gym_aloha.utils import sample_box_pose, sample_insertion_pose

    return sample_box_pose(seed) if task == "transfer_cube" else np.concatenate(sample_insertion_pose(seed))


def object_xy(task, pose):
    """Where the task's objects start on the table, from object_pose: x, y in metres of the cube (transfer_cube), or
    of the peg then the socket (insertion; each pose is x, y, z and a quaternion)."""
    pose = np.asarray(pose, np.float32)
    if task == "transfer_cube":
        return pose[:2]
    return np.concatenate([pose[0:2], pose[7:9]])


def reset(physics, task_obj, pose):
    """Start an episode with the objects at `pose` (the end-effector tasks draw theirs unseeded: overwrite it)."""
    from gym_aloha.tasks import sim

    sim.BOX_POSE[0] = pose  # the joint-space tasks read the pose from this module global
    with physics.reset_context():  # one context: a second would reset the arms, the mocap bodies and the controls
        task_obj.initialize_episode(physics)
        physics.data.qpos[-len(pose) :] = pose


def step(physics, task_obj, action, substeps=10):
    """One 50 Hz control step (10 physics steps of 2 ms), as control.Environment.step without its three renders."""
    task_obj.before_step(action, physics)
    physics.step(substeps)
    task_obj.after_step(physics)
    return task_obj.get_reward(physics)


def render(physics, size, camera="top"):
    return physics.render(height=size[0], width=size[1], camera_id=camera)


def qmul(a, b):
    """Hamilton product of (w, x, y, z) quaternions."""
    (aw, ax, ay, az), (bw, bx, by, bz) = a, b
    return np.array(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ]
    )


def about(axis, degrees):
    half = np.radians(degrees) / 2
    return np.array([np.cos(half), *(np.sin(half) * np.asarray(axis, float))])


def waypoints(task, mocap_left, mocap_right, pose):
    """ACT's scripted waypoints (scripted_policy.py) per arm: (t, xyz, quat, gripper 0 closed .. 1 open)."""
    left0, right0 = (mocap_left[:3], mocap_left[3:], 0), (mocap_right[:3], mocap_right[3:], 0)
    if task == "transfer_cube":
        box, meet = pose[:3], np.array([0, 0.5, 0.25])
        pick, meet_left, level = qmul(mocap_right[3:], about([0, 1, 0], -60)), about([1, 0, 0], 90), [1, 0, 0, 0]
        left = [
            (0, *left0),
            (100, meet + [-0.1, 0, -0.02], meet_left, 1),
            (260, meet + [0.02, 0, -0.02], meet_left, 1),
            (310, meet + [0.02, 0, -0.02], meet_left, 0),
            (360, meet + [-0.1, 0, -0.02], level, 0),
            (400, meet + [-0.1, 0, -0.02], level, 0),
        ]
        right = [
            (0, *right0),
            (90, box + [0, 0, 0.08], pick, 1),
            (130, box + [0, 0, -0.015], pick, 1),
            (170, box + [0, 0, -0.015], pick, 0),
            (200, meet + [0.05, 0, 0], pick, 0),
            (220, meet, pick, 0),
            (310, meet, pick, 1),
            (360, meet + [0.1, 0, 0], pick, 1),
            (400, meet + [0.1, 0, 0], pick, 1),
        ]
        return left, right
    peg, socket, meet, lift = pose[:3], pose[7:10], np.array([0, 0.5, 0.15]), 0.00715
    # ACT turns both grippers from the right arm's initial orientation (identical to the left's)
    pick_r, pick_l = qmul(mocap_right[3:], about([0, 1, 0], -60)), qmul(mocap_right[3:], about([0, 1, 0], 60))
    left = [
        (0, *left0),
        (120, socket + [0, 0, 0.08], pick_l, 1),
        (170, socket + [0, 0, -0.03], pick_l, 1),
        (220, socket + [0, 0, -0.03], pick_l, 0),
        (285, meet + [-0.1, 0, 0], pick_l, 0),
        (340, meet + [-0.05, 0, 0], pick_l, 0),
        (400, meet + [-0.05, 0, 0], pick_l, 0),
    ]
    right = [
        (0, *right0),
        (120, peg + [0, 0, 0.08], pick_r, 1),
        (170, peg + [0, 0, -0.03], pick_r, 1),
        (220, peg + [0, 0, -0.03], pick_r, 0),
        (285, meet + [0.1, 0, lift], pick_r, 0),
        (340, meet + [0.05, 0, lift], pick_r, 0),
        (400, meet + [0.05, 0, lift], pick_r, 0),
    ]
    return left, right


def interpolate(points, t):
    """Linear between the waypoints around t; the quaternion renormalized (MuJoCo 3 does not do it for mocap)."""
    i = max(k for k, p in enumerate(points) if p[0] <= t)
    (t0, x0, q0, g0), (t1, x1, q1, g1) = points[i], points[min(i + 1, len(points) - 1)]
    f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
    q = np.asarray(q0) + (np.asarray(q1) - q0) * f
    return np.concatenate([np.asarray(x0) + (np.asarray(x1) - x0) * f, q / np.linalg.norm(q), [g0 + (g1 - g0) * f]])


def scripted_rollout(task, seed, weld_fix=True, steps=EPISODE_LEN):
    """The waypoint policy in the end-effector task (no rendering). Returns the joint trajectory ACT replays,
    (steps + 1, 14) with the normalized gripper commands, the rewards, and the object pose."""
    physics, task_obj = make_sim(task, end_effector=True, weld_fix=weld_fix)
    pose = object_pose(task, seed)
    reset(physics, task_obj, pose)
    mocap = [np.concatenate([physics.data.mocap_pos[i], physics.data.mocap_quat[i]]) for i in (0, 1)]
    left, right = waypoints(task, *mocap, pose)

    def joints():
        q = task_obj.get_qpos(physics)
        q[GRIPPERS] = (physics.data.ctrl[[0, 2]] - GRIPPER_CLOSE) / (GRIPPER_OPEN - GRIPPER_CLOSE)
        return q

    trajectory, rewards = [joints()], []
    for t in range(steps):
        rewards.append(step(physics, task_obj, np.concatenate([interpolate(left, t), interpolate(right, t)])))
        trajectory.append(joints())
    return np.stack(trajectory), np.array(rewards), pose


def joint_noise(std, steps, seed):
    """(steps, 14) perturbations of the arm joints' targets for --noise (DART, Laskey et al. 2017): per joint an
    Ornstein-Uhlenbeck walk from 0 whose stationary std is `std` rad and which forgets over NOISE_STEPS steps; the
    grippers' columns stay 0. Drawn from the episode's seed, so a recording is repeatable."""
    rng = np.random.default_rng([seed, 1])  # a stream of its own: nothing else in a recording draws from the seed
    keep = 1 - 1 / NOISE_STEPS
    kick = std * np.sqrt(1 - keep**2)  # the walk's variance settles at kick^2 / (1 - keep^2) = std^2
    noise = np.zeros((steps, 14))
    for t in range(1, steps):
        noise[t] = keep * noise[t - 1] + kick * rng.standard_normal(14)
    noise[:, GRIPPERS] = 0
    return noise


def replay(task, trajectory, pose, size, fast_render=True, cameras=CAMERAS, zoom=1.0, noise=None):
    """Replay joint targets in the joint-space task, recording what a policy would see before each action.
    noise: (T, 14) added to the targets the arms execute (--noise); the caller stores the targets without it."""
    physics, task_obj = make_sim(task, fast_render=fast_render, zoom=zoom)
    reset(physics, task_obj, pose)
    if noise is None:
        noise = np.zeros_like(trajectory)
    obs = {"qpos": [], "qvel": [], **{c: [] for c in cameras}}
    rewards = []
    for action, offset in zip(trajectory, noise):
        obs["qpos"].append(task_obj.get_qpos(physics))
        obs["qvel"].append(task_obj.get_qvel(physics))
        for c in cameras:
            obs[c].append(render(physics, size, c))
        rewards.append(step(physics, task_obj, action + offset))
    return {k: np.stack(v) for k, v in obs.items()}, np.array(rewards)


def write_episode(path, task, seed, pose, obs, actions, fast_render, compression, zoom=1.0, cameras=CAMERAS, noise=0.0):
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        render_mode = "fast" if fast_render else "stock"
        f.attrs.update(sim=True, task=task, seed=seed, object_pose=pose, render=render_mode, zoom=zoom, noise=noise)
        for c in cameras:
            f.create_dataset(
                f"observations/images/{c}", data=obs[c], chunks=(1, *obs[c].shape[1:]), compression=compression
            )
        f["observations/qpos"] = obs["qpos"].astype(np.float32)
        f["observations/qvel"] = obs["qvel"].astype(np.float32)
        f["action"] = actions.astype(np.float32)
        # where the objects start, repeated for every frame: data.py reads a state per frame
        f["observations/object_xy"] = np.tile(object_xy(task, pose), (len(actions), 1))
        # and after the joint state: the state of a located policy that also knows where its arms are
        f["observations/qpos_object_xy"] = np.concatenate([f["observations/qpos"], f["observations/object_xy"]], 1)
    os.replace(tmp, path)


def camera_names(physics):
    """The scene's cameras by name, in the model's order (record.py's --cameras and evaluate.py's checks)."""
    return [physics.model.id2name(i, "camera") for i in range(physics.model.ncam)]


def check_cameras(text, physics):
    """--cameras as a tuple of the scene's camera names; an unknown or repeated name stops the run in one line."""
    have = camera_names(physics)
    cameras = tuple(text.split(","))
    unknown = [c for c in cameras if c not in have]
    if unknown:
        sys.exit(f"error: --cameras {text!r}: the scene has no camera {unknown[0]!r} (it has {', '.join(have)})")
    if len(set(cameras)) < len(cameras):
        sys.exit(f"error: --cameras {text!r}: a camera is named twice")
    return cameras


def parse_size(text, flag="--size"):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        assert h > 0 and w > 0
    except (ValueError, AssertionError):
        sys.exit(f"error: {flag} {text!r}: expected HEIGHTxWIDTH, e.g. 480x640")
    return h, w


def check_zoom(zoom):
    if not 1 <= zoom <= 10:
        sys.exit(f"error: --zoom {zoom}: expected 1 (the stock view) to 10")


def lock_out(out):
    """Create OUT and hold OUT/.lock for the rest of the process: a second run into the same OUT would number its
    episodes from the same files and replace the first's (and delete its .tmp files). The kernel drops the lock when
    the process ends, killed or not. Returns the open lock file: `with lock_out(out):` holds it for its block."""
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a")
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by another process: EAGAIN on Linux, NFS too
    except BlockingIOError:
        sys.exit(
            f"error: {out} is in use by another record.py run (it holds {lock.name}): wait for it to end, or use "
            "another OUT"
        )
    except OSError as e:
        sys.exit(f"error: {out} is not writable: {e}")
    return lock


def episode_settings(f):
    """The command-line settings an episode file was recorded with, as {flag: value} in the flags' own terms.
    Cameras are compared as a sorted list: h5py lists a group's members in name order, not the order asked for."""
    cameras = sorted(f["observations/images"])
    first = f[f"observations/images/{cameras[0]}"]
    return {
        "--task": f.attrs.get("task"),
        "--cameras": ",".join(cameras),
        "--size": "x".join(map(str, first.shape[1:3])),
        "--stock_render": f.attrs.get("render") == "stock",
        "--compression": first.compression or "none",
        "--zoom": float(f.attrs.get("zoom", 1.0)),
        "--noise": float(f.attrs["noise"]),
    }


def recorded_so_far(args, size, compression):
    """(episodes already in OUT, the next seed) for a resumed run: episode_0.. in order, each recorded with the
    settings asked for now; one with other settings stops the run, naming the file and the flag."""
    wanted = {
        "--task": args.task,
        "--cameras": ",".join(sorted(args.cameras)),
        "--size": "x".join(map(str, size)),
        "--stock_render": args.stock_render,
        "--compression": compression or "none",
        "--zoom": args.zoom,
        "--noise": args.noise,
    }
    done, seed = 0, args.seed
    for n in range(args.episodes):  # finished episodes are skipped; the next seed follows the last one used
        path = os.path.join(args.out, f"episode_{n}.hdf5")
        if not os.path.exists(path):
            break
        try:
            with h5py.File(path, "r") as f:
                found, seed = episode_settings(f), int(f.attrs["seed"]) + 1
        except (OSError, KeyError) as e:
            sys.exit(f"error: {path}: not an episode of record.py ({e}): move it out of {args.out}")
        for flag, value in wanted.items():
            if found[flag] != value:
                sys.exit(mismatch(path, flag, found[flag], value))
        done = n + 1
    return done, seed


def mismatch(path, flag, found, wanted):
    """The error for an episode recorded with another setting than this run's, in the flag's own terms."""
    if flag == "--stock_render":
        was, asked = ("--stock_render", "the fast render") if found else ("the fast render", "--stock_render")
        return f"error: {path} was recorded with {was}, not {asked}: use another OUT"
    preposition = "at" if flag in ("--size", "--zoom", "--noise") else "with"
    return f"error: {path} was recorded {preposition} {flag} {found}, not {wanted}: use another OUT"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="directory for episode_N.hdf5")
    p.add_argument("--task", default="transfer_cube", help=" or ".join(TASKS))
    p.add_argument("--episodes", type=int, default=50, help="successful episodes to keep")
    p.add_argument("--seed", type=int, default=0, help="the first seed tried; each try takes the next one")
    p.add_argument("--max_tries", type=int, default=0, help="give up after this many seeds (0: 2 x --episodes)")
    p.add_argument(
        "--cameras",
        default=",".join(CAMERAS),
        help="comma-separated simulator cameras to record, each as observations/images/NAME (the scene has "
        "top, angle, front_close, left_pillar, right_pillar, left_wrist, right_wrist; ACT's sim data: top)",
    )
    p.add_argument("--size", default="480x640", help="rendered frame size HEIGHTxWIDTH (ACT: 480x640)")
    p.add_argument(
        "--stock_render",
        action="store_true",
        help="the stock scene: shadows and 4x multisampling, about 10x slower to render",
    )
    p.add_argument(
        "--zoom",
        type=float,
        default=1.0,
        help="narrow the camera's field of view so the centre 1/ZOOM "
        "of the stock frame fills it: the cube covers more pixels (1: ACT's view)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="DART: the arms execute the scripted joint targets plus a slow random walk of this std in rad, "
        "while the stored actions stay the scripted targets, so the demos show the way back to the path from "
        "where the arm has drifted (0: ACT's demos; 0.03 moves the gripper about 1.4 cm and about half the "
        "replays then fail: raise --max_tries to 2.5 x --episodes)",
    )
    p.add_argument(
        "--compression",
        choices=["lzf", "gzip", "none"],
        default="lzf",
        help="frame compression (sim frames are mostly flat colour: lzf shrinks them ~30x)",
    )
    return p.parse_args(argv)


def record_episodes(args, size, compression, done, seed):
    """Try seeds from `seed` on until OUT holds --episodes good demos (`done` already there), a line each."""
    max_tries, tries, t_start = args.max_tries or 2 * args.episodes, seed - args.seed, time.time()
    with Progress(total=args.episodes, done=done, unit="episode") as progress:
        while done < args.episodes:
            if tries >= max_tries:
                sys.exit(
                    f"error: only {done} of {args.episodes} replays reached reward 4 in {tries} seeds "
                    f"({args.seed}..{seed - 1}); raise --max_tries or check the simulator pins"
                )
            t0 = time.time()
            trajectory, ee_rewards, pose = scripted_rollout(args.task, seed)
            t1 = time.time()
            trajectory = trajectory[:EPISODE_LEN]
            noise = joint_noise(args.noise, len(trajectory), seed)
            fast = not args.stock_render
            # the physics alone first (a fraction of a second against seconds of rendering): a replay that fails,
            # as some do under --noise, is not rendered; MuJoCo repeats the same steps exactly when it is
            _, rewards = replay(args.task, trajectory, pose, size, fast, (), args.zoom, noise)
            if rewards.max() == 4:
                obs, rewards = replay(args.task, trajectory, pose, size, fast, args.cameras, args.zoom, noise)
            tries += 1
            line = (
                f"seed {seed} | scripted max reward {ee_rewards.max()} | replay max reward {rewards.max()} | "
                f"scripted {t1 - t0:.1f} s, replay {time.time() - t1:.1f} s"
            )
            if rewards.max() == 4:
                path = os.path.join(args.out, f"episode_{done}.hdf5")
                write_episode(
                    path, args.task, seed, pose, obs, trajectory, fast, compression, args.zoom, args.cameras, args.noise
                )
                done += 1
                reached = int(np.argmax(rewards == 4)) + 1
                size_mb = os.path.getsize(path) / 1e6
                progress.update(
                    line=f"episode {done}/{args.episodes} | {line} | reward 4 at step {reached} | {size_mb:.1f} MB"
                )
            else:
                progress.write(f"dropped | {line}")
            seed += 1
    print(
        f"{args.out}: {done} episodes, {tries} seeds tried ({args.seed}..{seed - 1}), "
        f"{time.time() - t_start:.0f} s this run"
    )


def main(argv=None):
    args = parse_args(argv)
    if args.task not in TASKS:
        sys.exit(f"error: --task {args.task!r}: unknown task; use {', '.join(TASKS)}")
    if args.episodes < 1:
        sys.exit(f"error: --episodes {args.episodes}: need at least 1")
    check_zoom(args.zoom)
    if not 0 <= args.noise <= 0.2:
        sys.exit(f"error: --noise {args.noise}: expected 0 (none) to 0.2 rad (0.03 moves the gripper about 1.4 cm)")
    size, compression = parse_size(args.size), None if args.compression == "none" else args.compression
    physics, _ = make_sim(args.task)
    args.cameras = check_cameras(args.cameras, physics)
    limit = (physics.model.vis.global_.offheight, physics.model.vis.global_.offwidth)
    if size[0] > limit[0] or size[1] > limit[1]:
        sys.exit(f"error: --size {args.size}: larger than the scene's offscreen buffer {limit[0]}x{limit[1]}")
    with lock_out(args.out):
        done, seed = recorded_so_far(args, size, compression)
        # an interrupted run's partial files: no other run is writing them, this one holds the lock
        for tmp in glob.glob(os.path.join(args.out, "episode_*.hdf5.tmp")):
            os.remove(tmp)
        if done:
            print(f"{args.out}: {done} episodes already recorded, resuming at seed {seed}")
        record_episodes(args, size, compression, done, seed)


if __name__ == "__main__":
    main()
