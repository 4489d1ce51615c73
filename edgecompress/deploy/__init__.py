"""After the artifact: benchmarking on a device over SSH, trtexec logs, timing statistics, the bundle."""
