"""forkyard.checkpoint"""
