"""
Progress with an ETA for the long commands of the leaves (aloha/record.py, robotwin/convert.py): on a terminal, a
tqdm bar under the lines the command prints; when the output is a file or a pipe, the same lines, each ending with
the count and the ETA, and no bar (no carriage returns in a log).

    from progress import Progress
    with Progress(total=50, done=already, unit="episode") as progress:
        for ...:
            progress.update(line=f"episode {k}/50 | ...")   # one item finished, its line printed
            progress.write(f"seed {seed} dropped")           # a line that finishes no item
            progress.write(problem, file=sys.stderr)

The ETA is the time per item of this run (items done before it, `done`, cost nothing now) times the items left.
A leaf's own requirements pin tqdm (aloha/requirements.txt, robotwin/requirements.txt); the core never imports this.
"""

import sys
import time

from tqdm import tqdm


def duration(seconds):
    """'42s', '7m05s' or '2h03m': short enough for the end of a line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts finished items out of `total` (`done` of them finished before this run) and prints lines with it:
    through tqdm above a bar when `file` (default stdout) is a terminal, else with the elapsed time and ETA appended."""

    def __init__(self, total, done=0, unit="item", file=None, clock=time.monotonic):
        self.total, self.done, self.unit = total, done, unit
        self.file = file or sys.stdout
        self.clock, self.start, self.start_done = clock, clock(), done
        self.bar = None
        if self.file.isatty():
            self.bar = tqdm(total=total, initial=done, unit=unit, file=self.file, dynamic_ncols=True, smoothing=0)

    def eta(self):
        """Seconds left at this run's pace so far, or None before its first item."""
        finished = self.done - self.start_done
        if finished < 1:
            return None
        return (self.clock() - self.start) / finished * (self.total - self.done)

    def suffix(self):
        """' | 41s elapsed, eta 10m40s' for a plain line (the caller's line gives the count)."""
        eta = self.eta()
        left = "eta ?" if eta is None else f"eta {duration(eta)}"
        return f" | {duration(self.clock() - self.start)} elapsed, {left}"

    def update(self, n=1, line=None):
        """n more items finished; line, if any, is printed about them (with the elapsed time and ETA when plain)."""
        self.done += n
        if self.bar is not None:
            if line is not None:
                self.bar.write(line, file=self.file)
            self.bar.update(n)
        elif line is not None:
            print(line + self.suffix(), file=self.file, flush=True)

    def write(self, line, file=None):
        """A line that finishes no item (a skipped seed, a problem on stderr), kept clear of the bar."""
        if self.bar is not None:
            self.bar.write(line, file=file or self.file)
        else:
            print(line, file=file or self.file, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
