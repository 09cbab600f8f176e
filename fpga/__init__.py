"""FPGA flow: board tops, the UART host bridge and the host tool."""
