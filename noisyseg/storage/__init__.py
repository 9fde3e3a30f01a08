"""noisyseg.storage"""
