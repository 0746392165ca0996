# A fork bomb at import: every process forks as fast as it can until RLIMIT_NPROC stops it, then
# waits (so that the machine it runs on stays usable while the test waits for it).
import os as _os
import signal as _signal

while True:
    try:
        _os.fork()
    except OSError:
        _signal.pause()
