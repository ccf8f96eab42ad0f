"""First import of the decode workers' fork server (see batch_decode._prestart).

Ctrl-C is the main process's to handle: the server and the workers forked
from it ignore SIGINT from here on, before numpy and PIL load (a SIGINT
during those imports would end the server with a traceback). Python's
multiprocessing server ignores it too, but only after its preloads.
"""

from imgcls.interrupts import ignore

ignore()
