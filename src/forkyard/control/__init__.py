"""forkyard.control"""
