"""noisyseg.tuning"""
