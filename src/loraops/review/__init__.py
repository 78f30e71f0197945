"""Layer 4: people in the loop: rubric review sheets and ratings, the approval pause."""
