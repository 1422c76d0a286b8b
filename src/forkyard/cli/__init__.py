"""forkyard.cli"""
