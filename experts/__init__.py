"""The expert half: routed experts held as stacked weights, and the math over them.

Nothing here imports Ray or gRPC; the actor and server shells wrap `ExpertStore`.
"""

from experts.ffn import expert_ffn_grouped, expert_ffn_reference
from experts.store import ExpertStore

__all__ = ["ExpertStore", "expert_ffn_grouped", "expert_ffn_reference"]
