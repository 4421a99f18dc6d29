import Glibc
import Instar

// instar-isolate: the helper process of isolated mode (docs/isolated.md). The library spawns it with its socket
// as fd 3; it takes one request, confines itself and answers. Not meant to be run by hand.
exit(IsolatedMode.helperMain())
