"""forkyard.guest"""
