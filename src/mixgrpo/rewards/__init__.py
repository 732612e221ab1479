"""Reward models behind one interface and a registry of names."""

from mixgrpo.rewards.base import Reward, available_rewards, build_reward, register_reward

__all__ = ["Reward", "available_rewards", "build_reward", "register_reward"]
