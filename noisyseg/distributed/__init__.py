"""noisyseg.distributed"""
