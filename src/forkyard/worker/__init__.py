"""forkyard.worker"""
