"""cocotb testbenches: TB classes, drivers and coroutines run inside Verilator by tests/."""
