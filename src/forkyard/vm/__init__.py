"""forkyard.vm"""
