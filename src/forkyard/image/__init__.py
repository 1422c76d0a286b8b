"""forkyard.image"""
