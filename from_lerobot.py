"""
Convert a LeRobot dataset (format v3.0, as lerobot 0.4 writes it; v2.1 and v2.0 too) into nanoOFT's episode files.

$ pip install -r requirements-lerobot.txt
$ python from_lerobot.py data/lerobot/transfer_cube data/transfer_cube
$ python from_lerobot.py SRC OUT --episodes 0,2,5-9 --size 224x224
$ python check_data.py data/transfer_cube    # names the layout and prints the train.py flags that read it

SRC is a dataset directory as LeRobot stores it (meta/info.json, meta/tasks, meta/episodes, data/*.parquet,
videos/*.mp4); download one first, e.g.
`hf download lerobot/aloha_sim_transfer_cube_human --repo-type dataset --local-dir data/lerobot/transfer_cube`.
Episode N becomes OUT/episode_{N}.hdf5 in ACT's layout, which data.py detects (docs/lerobot.md has more):
  observations/images/<camera>  (T, H, W, 3) uint8 RGB, every video stream decoded in order with PyAV (LeRobot's
                                AV1 too); <camera> is the feature's key less "observation.images."
  observations/qpos             (T, S) observation.state (absent when the dataset has none)
  action                        (T, A) action
  seen                          the episode's task strings, in the order the frames first show them
  task                          (T,) int: the seen entry each frame was recorded under
Each dataset keeps its LeRobot key (attribute lerobot_key) and the feature's names (attribute names, JSON); the root
keeps fps, robot_type, lerobot_codebase_version, lerobot_episode_index and lerobot_source (the SRC directory).
Frames stay at the video's size unless --size HxW resizes them (PIL, bicubic); every camera of every episode must
end up the same size. A file is written under a temporary name and renamed when whole, so a re-run skips finished
episodes and redoes an interrupted one. A broken episode (a missing or undecodable video, a clip whose frames
disagree with the parquet rows) is named in one line and the rest still convert; the exit status is then 1.
"""

import argparse
import glob
import json
import os
import re
import sys
import time

import av
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import data

VERSIONS = ("v3.0", "v2.1", "v2.0")  # v2.0 differs from v2.1 only in statistics files, which nothing here reads
CAMERA_PREFIXES = ("observation.images.", "observation.")


class LeRobotError(ValueError):
    """Bad input: the message names the file or episode and what is wrong."""


def parse_episodes(text):
    """'0,2,5-9' -> [0, 2, 5, 6, 7, 8, 9]."""
    picked = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] and int(match[2]) < int(match[1])):
            raise ValueError(f"--episodes {text}: expected numbers and ranges like 0,2,5-9, not {part!r}")
        last = int(match[2]) if match[2] else int(match[1])
        picked += range(int(match[1]), last + 1)
    return sorted(set(picked))


def parse_size(text):
    """'224x224' (height x width) -> (224, 224)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"--size {text}: expected HEIGHTxWIDTH, e.g. 224x224")
    return int(match[1]), int(match[2])


def read_info(src):
    """meta/info.json, checked for a version and the features this converter needs."""
    path = os.path.join(src, "meta", "info.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise LeRobotError(f"{src}: no meta/info.json, so not a LeRobot dataset directory") from None
    except (OSError, ValueError) as e:
        raise LeRobotError(f"{path}: not readable JSON ({e})") from None
    version = info.get("codebase_version") if isinstance(info, dict) else None
    if version not in VERSIONS:
        raise LeRobotError(f"{path}: codebase_version {version}; from_lerobot.py reads {', '.join(VERSIONS)}")
    kinds = {key: feature.get("dtype") for key, feature in info.get("features", {}).items()}
    if "action" not in kinds or "video" not in kinds.values():
        found = ", ".join(f"{key} ({kind})" for key, kind in kinds.items())
        raise LeRobotError(f"{path}: needs an action and at least one video feature; found {found or 'none'}")
    return info


def camera_names(keys):
    """HDF5 names of the video features: the key less observation.images. (or observation.), the whole key when two
    would be the same."""
    names = []
    for key in keys:
        prefix = next((p for p in CAMERA_PREFIXES if key.startswith(p) and len(key) > len(p)), "")
        names.append(key.removeprefix(prefix))
    return names if len(set(names)) == len(names) else list(keys)


def video_size(feature):
    """(height, width) of a video feature, from its video info, else from its shape and names."""
    extra = feature.get("info") or {}
    if "video.height" in extra and "video.width" in extra:
        return extra["video.height"], extra["video.width"]
    names, shape = feature.get("names") or ["height", "width", "channels"], feature["shape"]
    return shape[names.index("height")], shape[names.index("width")]


def read_tasks(src, version):
    """{task_index: task string}: meta/tasks.parquet (v3.0, the task being pandas' index) or meta/tasks.jsonl."""
    if version == "v3.0":
        table = pq.read_table(os.path.join(src, "meta", "tasks.parquet"))
        kinds = {field.name: field.type for field in table.schema}
        texts = [c for c, kind in kinds.items() if pa.types.is_string(kind) or pa.types.is_large_string(kind)]
        if "task_index" not in kinds or len(texts) != 1:
            raise LeRobotError(f"{src}: meta/tasks.parquet has not one task_index and one text column: {list(kinds)}")
        return dict(zip(table.column("task_index").to_pylist(), table.column(texts[0]).to_pylist()))
    with open(os.path.join(src, "meta", "tasks.jsonl")) as f:
        return {row["task_index"]: row["task"] for row in map(json.loads, filter(str.strip, f))}


def episodes_v3(src, info, videos):
    """{N: episode} from meta/episodes/*/*.parquet: its length, parquet file and, per video feature, the file and
    the [from, to) seconds its frames fill (v3.0 appends many episodes to one file)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(src, "meta", "episodes", "*", "*.parquet"))):
        columns = [c for c in pq.read_schema(path).names if not c.startswith("stats/")]
        for row in pq.read_table(path, columns=columns).to_pylist():
            where = {"chunk_index": row["data/chunk_index"], "file_index": row["data/file_index"]}
            episode = {"length": row["length"], "data": info["data_path"].format(**where)}
            for key in videos:
                where = {"chunk_index": row[f"videos/{key}/chunk_index"], "file_index": row[f"videos/{key}/file_index"]}
                seconds = (row[f"videos/{key}/from_timestamp"], row[f"videos/{key}/to_timestamp"])
                episode[key] = (info["video_path"].format(video_key=key, **where), *seconds)
            found[row["episode_index"]] = episode
    return found


def episodes_v2(src, info, videos):
    """{N: episode} from meta/episodes.jsonl: one parquet file and one whole video file per camera and episode."""
    found = {}
    with open(os.path.join(src, "meta", "episodes.jsonl")) as f:
        for row in map(json.loads, filter(str.strip, f)):
            n = row["episode_index"]
            where = {"episode_chunk": n // info["chunks_size"], "episode_index": n}
            episode = {"length": row["length"], "data": info["data_path"].format(**where)}
            for key in videos:
                episode[key] = (info["video_path"].format(video_key=key, **where), 0.0, None)
            found[n] = episode
    return found


def read_rows(src, episode, n, has_state):
    """(state or None, action, task_index per frame) of episode n from its parquet rows, in frame order."""
    columns = ["episode_index", "frame_index", "task_index", "action"]
    if has_state:
        columns.append("observation.state")
    path = os.path.join(src, episode["data"])
    if not os.path.isfile(path):
        raise LeRobotError(f"{episode['data']}: missing")
    try:
        table = pq.read_table(path, columns=columns, filters=[("episode_index", "=", n)]).sort_by("frame_index")
    except (pa.ArrowException, OSError) as e:
        raise LeRobotError(f"{episode['data']}: not LeRobot's frames table ({str(e).splitlines()[0]})") from None
    order = table.column("frame_index").to_numpy()
    if len(table) != episode["length"] or not np.array_equal(order, np.arange(len(table))):
        raise LeRobotError(
            f"{episode['data']}: {len(table)} rows with frame_index {order.min(initial=0)}-{order.max(initial=-1)}, "
            f"expected frames 0-{episode['length'] - 1} (the episode's length in the metadata)"
        )

    def matrix(name):
        return np.asarray(table.column(name).combine_chunks().flatten()).reshape(len(table), -1)

    state = matrix("observation.state") if has_state else None
    return state, matrix("action"), table.column("task_index").to_numpy()


def clip_frames(path, start, stop, fps):
    """The frames of a video file whose times lie in [start, stop) seconds (stop None: to its end) as PIL images
    in order, decoded by PyAV (its wheels bring dav1d for LeRobot's AV1)."""
    half = 0.5 / fps  # frame times are multiples of 1/fps: half a frame absorbs the rounding of the timestamps
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if start > 0:  # to the keyframe at or before the clip's first frame
            container.seek(int(start / stream.time_base), stream=stream)
        for frame in container.decode(stream):
            if stop is not None and frame.time >= stop - half:
                return
            if frame.time >= start - half:
                yield frame.to_image()


def write_camera(f, name, frames, length, size):
    """Frames (resized to size (H, W) when given) into f[name] (length, H, W, 3) uint8; returns how many there were
    (all are counted, the first length written)."""
    count, video = 0, None
    for image in frames:
        if count < length:
            if size and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BICUBIC)
            rgb = np.asarray(image.convert("RGB"))
            if video is None:
                video = f.create_dataset(name, (length, *rgb.shape), np.uint8, chunks=(1, *rgb.shape))
            if rgb.shape != video.shape[1:]:
                raise LeRobotError(
                    f"frame {count} is {rgb.shape[0]}x{rgb.shape[1]}, frame 0 {video.shape[1]}x{video.shape[2]}"
                )
            video[count] = rgb
        count += 1
    return count


def write_episode(f, src, info, n, episode, cameras, size, rows, tasks):
    """One episode's datasets and attributes into the open file f (see the module docstring)."""
    state, action, task_index = rows
    seen = list(dict.fromkeys(tasks[i] for i in task_index.tolist()))  # in the order the frames first show them
    features = info["features"]
    f.attrs.update(
        lerobot_codebase_version=info["codebase_version"],
        lerobot_episode_index=n,
        lerobot_source=os.path.abspath(src),
        fps=info["fps"],
        robot_type=info.get("robot_type") or "",
    )
    named = [("action", "action", action)]
    if state is not None:
        named.append(("observations/qpos", "observation.state", state))
    for name, key, values in named:
        f[name] = values
        f[name].attrs.update(lerobot_key=key, names=json.dumps(features[key].get("names")))
    f.create_dataset("seen", data=seen, dtype=h5py.string_dtype())
    f["task"] = np.array([seen.index(tasks[i]) for i in task_index.tolist()])
    for key, camera in cameras.items():
        path, start, stop = episode[key]
        if not os.path.isfile(os.path.join(src, path)):
            raise LeRobotError(f"{key}: {path}: missing")
        frames = clip_frames(os.path.join(src, path), start, stop, info["fps"])
        try:
            count = write_camera(f, f"observations/images/{camera}", frames, len(action), size)
        except av.FFmpegError as e:
            raise LeRobotError(f"{key}: {path}: does not decode ({e})") from None
        except LeRobotError as e:
            raise LeRobotError(f"{key}: {path}: {e}") from None
        span = f"{start:.3f}-{stop:.3f} s" if stop is not None else "all"
        if count == 0:
            raise LeRobotError(f"{key}: no frames in {path} ({span})")
        if count != len(action):
            raise LeRobotError(f"{key}: {count} frames in {path} ({span}), but {len(action)} parquet rows")
        f[f"observations/images/{camera}"].attrs.update(lerobot_key=key)
    return len(action), len(seen)


def convert_episode(src, info, n, episode, out, cameras, size, tasks):
    """Episode n -> OUT/episode_{n}.hdf5, written as .tmp, checked with data.py, then renamed. Returns (frames,
    tasks); a LeRobotError says what is wrong."""
    target = os.path.join(out, f"episode_{n}.hdf5")
    tmp = target + ".tmp"  # outside list_episodes' episode_*.hdf5: a half-written file is never read
    rows = read_rows(src, episode, n, "observation.state" in info["features"])
    unknown = sorted(set(rows[2].tolist()) - set(tasks))
    if unknown:
        raise LeRobotError(f"{episode['data']}: task_index {unknown} not in meta/tasks")
    try:
        with h5py.File(tmp, "w") as f:
            counts = write_episode(f, src, info, n, episode, cameras, size, rows, tasks)
        names = [f"observations/images/{c}" for c in cameras.values()]
        data.check_episodes([tmp], names, 1, rows[1].shape[1])
    except (LeRobotError, data.DataError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        lines = [line.removeprefix(f"{tmp}: ") for line in str(e).splitlines()]  # data.py's lines name the .tmp
        raise LeRobotError("; ".join(lines)) from None
    os.replace(tmp, target)
    return counts


def load_dataset(src, size):
    """(info, {video key: camera name}, {task_index: task}, {N: episode}) of a dataset directory, checked up front."""
    info = read_info(src)
    videos = [k for k, v in info["features"].items() if v.get("dtype") == "video"]
    try:
        sizes = {key: video_size(info["features"][key]) for key in videos}
        tasks = read_tasks(src, info["codebase_version"])
        read = episodes_v3 if info["codebase_version"] == "v3.0" else episodes_v2
        episodes = read(src, info, videos)
    except FileNotFoundError as e:
        raise LeRobotError(f"{src}: {os.path.relpath(e.filename, src)} missing") from None
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise LeRobotError(f"{src}: metadata not as LeRobot {info['codebase_version']} writes it ({e!r})") from None
    if size is None and len(set(sizes.values())) > 1:
        found = ", ".join(f"{key} {h}x{w}" for key, (h, w) in sizes.items())
        raise LeRobotError(f"{src}: the cameras differ in size ({found}): pass --size HxW (data.py needs one size)")
    if not episodes:
        raise LeRobotError(f"{src}: the metadata lists no episodes")
    return info, dict(zip(videos, camera_names(videos))), tasks, episodes


def eta(seconds):
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def convert_all(src, out, picked, size, loaded):
    """Convert the picked episodes, a line each; returns the episode numbers that failed."""
    info, cameras, tasks, episodes = loaded
    todo = [n for n in picked if not os.path.exists(os.path.join(out, f"episode_{n}.hdf5"))]
    failed, spent, done = [], 0.0, 0
    for k, n in enumerate(picked, 1):
        if n not in todo:
            print(f"[{k}/{len(picked)}] episode {n}: already converted, skipped")
            continue
        t0 = time.time()
        try:
            frames, texts = convert_episode(src, info, n, episodes[n], out, cameras, size, tasks)
        except LeRobotError as e:
            print(f"episode {n}: {e}", file=sys.stderr, flush=True)
            failed.append(n)
            continue
        spent, done = spent + time.time() - t0, done + 1
        left = spent / done * (len(todo) - todo.index(n) - 1)
        print(
            f"[{k}/{len(picked)}] episode {n} -> {out}/episode_{n}.hdf5: {frames} frames, {len(cameras)} cameras, "
            f"tasks: {texts} ({time.time() - t0:.1f}s, eta {eta(left)})",
            flush=True,
        )
    return failed, len(picked) - len(todo)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a LeRobot dataset directory (meta/info.json, data/, videos/)")
    parser.add_argument("out", help="directory for the episode_{N}.hdf5 files (created when missing)")
    parser.add_argument("--episodes", help="episode numbers to convert, e.g. 0,2,5-9; default: all")
    parser.add_argument("--size", help="resize every frame to HEIGHTxWIDTH (PIL, bicubic), e.g. 224x224")
    args = parser.parse_args(argv)
    try:
        picked = parse_episodes(args.episodes) if args.episodes else None
        size = parse_size(args.size) if args.size else None
    except ValueError as e:
        parser.error(str(e))
    try:
        loaded = load_dataset(args.src, size)
    except LeRobotError as e:
        sys.exit(str(e))
    episodes = loaded[3]
    unknown = [n for n in picked or [] if n not in episodes]
    if unknown:
        sys.exit(f"--episodes: {unknown} not in {args.src} (episodes {min(episodes)}-{max(episodes)})")
    picked = picked or sorted(episodes)
    os.makedirs(args.out, exist_ok=True)
    try:
        failed, skipped = convert_all(args.src, args.out, picked, size, loaded)
    except KeyboardInterrupt:
        sys.exit("interrupted; run the same command again to convert the rest")
    if len(failed) < len(picked):  # files from an earlier run at another --size would not mix with these
        cameras = [f"observations/images/{c}" for c in loaded[1].values()]
        try:
            data.check_episodes(data.list_episodes(args.out), cameras, 1, loaded[0]["features"]["action"]["shape"][0])
        except data.DataError as e:
            sys.exit(str(e))
    summary = (
        f"{args.out}: {len(picked) - len(failed) - skipped} converted, {skipped} already there, {len(failed)} failed"
    )
    if failed:
        sys.exit(f"{summary} (episodes {','.join(map(str, failed))})")
    print(f"{summary}; check them with: python check_data.py {args.out}")


if __name__ == "__main__":
    main()
