"""A clean stop on a signal: a scheduler's preemption (SIGTERM, then the same command requeued)
or Ctrl-C (SIGINT) stops the run at a step boundary, saved.

- The first SIGTERM or SIGINT only sets `StopSignals.signum`; the loop finishes the step it is
  in. Ranks agree through the step's one all-reduce (train.py adds a 0/1 flag to the logged
  values), so a run that gets no signal pays no collective and no host sync for this.
- The loop then writes a checkpoint, prints one line naming the command that continues the
  run (the same one) and exits with 128 + the signal's number (143 SIGTERM, 130 SIGINT), the
  shell's code for "stopped by a signal": a script's `train.py && evaluate.py` stops there.
- A second SIGINT exits at once (code 130), saving nothing beyond the last checkpoint.
- Under torchrun, the first worker to exit 143 makes the agent send SIGTERM to the others. A
  rank that has saved calls `stop.outlast_the_agent()` before it exits: SIGTERM is ignored from
  then on, so each rank exits 143 itself. A Python handler would not do: the interpreter puts
  back the default action of Python handlers while it shuts down, and the agent's SIGTERM
  arriving then kills the rank (exit -15), a race that a slow shutdown loses.
Only the main thread may install handlers: `stop = StopSignals().install()` before the loop,
`stop.restore()` after it puts the previous ones back (a notebook calling main() keeps its
Ctrl-C; the final export is not stopped half-way, it is written to a temporary name).
Importing this file does nothing.
"""
import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self):
        self.signum = 0  # the first stop signal received, 0 = none
        self._previous = {}

    def install(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum and signum == signal.SIGINT:
            _say(f"train.py: second {name}: exiting now, without a checkpoint\n")
            os._exit(128 + signum)
        if not self.signum:
            self.signum = signum
            _say(f"train.py: {name}: stopping after this step with a checkpoint "
                 f"(Ctrl-C again exits at once)\n")

    def outlast_the_agent(self) -> None:
        """SIGTERM ignored until this process ends, its shutdown included (see above)."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    @property
    def exit_code(self) -> int:
        """128 + the signal; a rank that saw none itself stops because another did: 143."""
        return 128 + (self.signum or signal.SIGTERM)


def _say(text: str) -> None:
    """One line on stderr, from rank 0 only; os.write, as print may not re-enter itself
    from a handler that interrupts a print."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, text.encode())
