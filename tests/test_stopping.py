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
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with StopSignals():
            with pytest.raises(Interrupted, match="stopped by SIGINT"):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(100):  # the handler runs in the main thread, between bytecodes
                    pass
    finally:
        signal.signal(signal.SIGINT, before_int)


def test_a_signal_ignored_when_the_run_began_stays_ignored():
    """SIGINT is SIG_IGN in a shell's background job (and for nohup's children): a run there must not
    start answering it; SIGTERM is still handled."""
    before_int = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(100):
                    pass
                assert stop() == 0
                os.kill(os.getpid(), signal.SIGTERM)
                assert stop() == signal.SIGTERM
                stop.signal = 0  # handled: the block ends without raising
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before_int)
