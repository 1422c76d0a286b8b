"""forkyard.host"""
