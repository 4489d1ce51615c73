"""What a candidate costs on a target: exported graph -> kernels, kernel latency models and their profiling, the roofline, refits to device measurements, calibration to this machine."""
