"""The helper's networking layer: bridge, TAPs, address pool, nftables, forwards.

Pure pieces (no I/O, unit-tested without root):

* :mod:`.config`   -- :class:`NetConfig`, the operator's network settings, validated;
* :mod:`.model`    -- typed state: workspaces, policies, forwards; input validation;
* :mod:`.naming`   -- TAP names, MACs and chain names derived from addresses/names;
* :mod:`.pool`     -- address allocation from the subnet;
* :mod:`.ruleset`  -- the whole nftables ruleset (``table bridge agentiso`` and
  ``table inet agentiso``) as one nft JSON transaction, built from typed state.

I/O adapters (thin, tested for real inside network namespaces):

* :mod:`.store`    -- the pool/state JSON file, written atomically;
* :mod:`.nft`      -- ``nft -j -f -``;
* :mod:`.links`    -- bridge, sysctls, link listing/removal (pyroute2);
* :mod:`.tap`      -- TAP devices opened through ``/dev/net/tun``;
* :mod:`.ports`    -- "is this host port free" by trying to bind it.

:class:`.manager.NetworkManager` ties them together for the VM engine.
See docs/network.md for the design and the rule layout.
"""
