"""noisyseg.benchmarking"""
