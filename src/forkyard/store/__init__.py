"""forkyard.store"""
