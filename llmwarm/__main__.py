from llmwarm.cli import main

main()
