"""The management cluster: the replicated cluster map, placement and the manager daemon.

The cluster map and the commands that change it (:mod:`lamina.mgmt.clustermap`) and the
placement of new layers (:mod:`lamina.mgmt.placement`) are pure code; Raft only orders the
commands.
"""
