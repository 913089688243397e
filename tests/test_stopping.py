"""SIGTERM/SIGINT for the length of a run: deferred inside training, at once elsewhere, once only."""
import os
import signal

import pytest

from encodenet_timm import Interrupted
from encodenet_timm.stopping import StopSignals


def test_a_signal_is_deferred_inside_training_and_raised_at_once_elsewhere():
    # what was installed before (SIGINT is SIG_IGN in a background job)
    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        with pytest.raises(Interrupted) as raised:
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                assert stop() == signal.SIGTERM  # recorded for the loop to poll, nothing raised yet
                os.kill(os.getpid(), signal.SIGINT)  # a second signal: ignored
                assert stop() == signal.SIGTERM
        assert raised.value.signal == signal.SIGTERM  # not acted on inside: raised at the end of the block
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is before_int
    with StopSignals():
        with pytest.raises(Interrupted, match="stopped by SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs in the main thread, between bytecodes
                pass
