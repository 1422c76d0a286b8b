"""forkyard.tools"""
