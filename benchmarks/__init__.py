"""The benchmarks: each runs real servers side by side on this machine, prints the ratios
measured in one run and writes its section of the docs (`python -m benchmarks.NAME --help`)."""
