"""forkyard.sdk"""
