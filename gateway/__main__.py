from posemesh.gateway.server import main

main()
