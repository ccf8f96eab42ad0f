import signal
import threading

# Ctrl-C while the CLI imports: held (not lost), raised once it is safe; see cli.hold_sigint
if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

from imgcls.cli import main  # noqa: E402

main()
